/*
 * direct_insert.h — rows into the extension's own tables without a
 * statement (direct_insert.c).
 */
#ifndef EB_DIRECT_INSERT_H
#define EB_DIRECT_INSERT_H

#include "storage/lockdefs.h"
#include "utils/relcache.h"

typedef struct EbDirectInsert EbDirectInsert;

extern Relation eb_open_own_table(const char *name, LOCKMODE lockmode);
extern bool eb_direct_ok(Relation rel, const Oid *types, int ntypes, AttrNumber identity_att,
						 uint32 nullable);
extern EbDirectInsert *eb_direct_begin(Relation rel);
extern void eb_direct_row(EbDirectInsert *d, const Datum *values, const bool *isnull);
extern void eb_direct_end(EbDirectInsert *d);

#endif							/* EB_DIRECT_INSERT_H */
