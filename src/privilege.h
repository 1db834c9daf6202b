/*
 * privilege.h — the user and settings statements and handlers run with
 * (privilege.c), the DDL guard for roles and handler functions
 * (ddl_guard.c), and the handler signature check (subscription.c).
 */
#ifndef EB_PRIVILEGE_H
#define EB_PRIVILEGE_H

typedef struct EbSecContext
{
	Oid			save_uid;
	int			save_sec;
	int			nestlevel;
} EbSecContext;

extern void eb_capture_config_search_path(void);
extern void eb_pin_worker_search_path(void);
extern Oid	eb_extension_owner(void);
extern void eb_as_owner_begin(EbSecContext *ctx);
extern void eb_as_owner_end(EbSecContext *ctx);
extern uint64 eb_exec_as_owner(const char *sql, int nargs, Oid *types, Datum *values,
							   const char *nulls, int expected);
extern bool eb_may_act_for(Oid role);
extern void eb_require_owner(Oid role, const char *action, int64 subscription_id);
extern void eb_handler_context_begin(EbSecContext *ctx, Oid role);
extern void eb_handler_context_end(EbSecContext *ctx);
extern void eb_constraints_immediate(void);

/* ddl_guard.c */
extern void eb_install_ddl_guard(void);

/* subscription.c */
extern bool eb_handler_signature_ok(Oid handler);

#endif							/* EB_PRIVILEGE_H */
