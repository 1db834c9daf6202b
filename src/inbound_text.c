/*
 * inbound_text.c — checks of an inbound message's text made before any
 * PostgreSQL parser sees it, for the decoder (decode.c): each one stands
 * for a routine that would throw on the input.  The JSON nesting depth
 * (the JSON parser recurses per level and stops at the stack depth limit),
 * the numbers numeric cannot hold (numeric_in), the number of JSON tokens
 * (jsonb's size limits), conversion from UTF-8 to the database encoding
 * without throwing (and of \uXXXX escapes, which the JSON parser would
 * convert one by one, throwing), and RFC 3339 timestamps (timestamptz_in).
 */
#include "postgres.h"

#include "access/xact.h"
#include "catalog/namespace.h"
#include "mb/pg_wchar.h"
#include "utils/datetime.h"
#include "utils/memutils.h"
#include "utils/resowner.h"
#include "utils/timestamp.h"

#include "envelope.h"

/*
 * numeric's storage limits (numeric.c): at most 16383 digits after the
 * decimal point, and a weight of at most 32767 base-10000 digits, i.e. a
 * most significant decimal digit at most 131071 places before the point.
 */
#define NUMERIC_SCALE_LIMIT		16383
#define NUMERIC_DWEIGHT_LIMIT	131071
/* Exponents beyond this are refused outright (numeric_in: INT_MAX / 2). */
#define EXPONENT_LIMIT			1000000
/* Text converted to the database encoding this many bytes at a time. */
#define CONVERT_CHUNK			65536

/* s as printable ASCII for a reason: other bytes become '?', clipped to max. */
char *
eb_printable(const char *s, size_t len, size_t max)
{
	StringInfoData buf;

	initStringInfo(&buf);
	for (size_t i = 0; i < len && i < max; i++)
	{
		unsigned char c = (unsigned char) s[i];

		appendStringInfoChar(&buf, (c >= 0x20 && c < 0x7f) ? (char) c : '?');
	}
	if (len > max)
		appendStringInfoString(&buf, "...");
	return buf.data;
}

/* Does the database store text in an encoding other than UTF-8? */
bool
eb_needs_conversion(void)
{
	int			enc = GetDatabaseEncoding();

	return enc != PG_UTF8 && enc != PG_SQL_ASCII;
}

/*
 * The conversion function from UTF-8 to the database encoding (NULL: none),
 * looked up and resolved once per process.  Both read the catalog, so they
 * need a transaction; the dispatcher decodes outside one and gets a short
 * one here, the first time only (calling the function through the kept
 * FmgrInfo reads no catalog).  Called before decoding, never inside the
 * safety net.
 */
FmgrInfo *
eb_utf8_to_server_conversion(void)
{
	static bool looked_up = false;
	static FmgrInfo *flinfo = NULL;

	if (!looked_up)
	{
		MemoryContext cxt = CurrentMemoryContext;
		ResourceOwner owner = CurrentResourceOwner;
		bool		own = !IsTransactionState();
		Oid			proc;

		if (own)
			StartTransactionCommand();
		proc = FindDefaultConversionProc(PG_UTF8, GetDatabaseEncoding());
		if (OidIsValid(proc))
		{
			flinfo = MemoryContextAllocZero(TopMemoryContext, sizeof(FmgrInfo));
			fmgr_info_cxt(proc, flinfo, TopMemoryContext);
		}
		if (own)
		{
			CommitTransactionCommand();
			CurrentResourceOwner = owner;
		}
		MemoryContextSwitchTo(cxt);
		looked_up = true;
	}
	return flinfo;
}

/*
 * Valid UTF-8 without NUL bytes, in the database encoding, without throwing
 * (the conversion functions' noError mode).  False when the database
 * encoding cannot represent some character.
 */
bool
eb_utf8_to_server(const char *s, size_t len, char **out, size_t *outlen)
{
	int			enc = GetDatabaseEncoding();
	FmgrInfo   *conversion;
	StringInfoData buf;
	size_t		pos = 0;

	if (!eb_needs_conversion() || len == 0)
	{
		*out = pnstrdup(s, len);
		*outlen = len;
		return true;
	}
	conversion = eb_utf8_to_server_conversion();
	if (conversion == NULL)
		return false;
	initStringInfo(&buf);
	while (pos < len)
	{
		int			chunk = (int) Min(len - pos, CONVERT_CHUNK);
		int			done;

		enlargeStringInfo(&buf, chunk * MAX_CONVERSION_GROWTH + 1);
		/* As pg_do_encoding_conversion_buf, through the kept FmgrInfo. */
		done = DatumGetInt32(FunctionCall6(conversion, Int32GetDatum(PG_UTF8), Int32GetDatum(enc),
										   CStringGetDatum(s + pos),
										   CStringGetDatum(buf.data + buf.len),
										   Int32GetDatum(chunk), BoolGetDatum(true)));

		/*
		 * It stops before a character it cannot convert, or one cut by the
		 * chunk's end (converted with the next chunk): nothing done means
		 * the former.
		 */
		if (done <= 0)
			return false;
		buf.len += strlen(buf.data + buf.len);
		pos += done;
	}
	*out = buf.data;
	*outlen = buf.len;
	return true;
}

/* Value of the 4 hex digits at s, or -1. */
static int
hex4(const char *s)
{
	int			v = 0;

	for (int i = 0; i < 4; i++)
	{
		char		c = s[i];

		v <<= 4;
		if (c >= '0' && c <= '9')
			v |= c - '0';
		else if (c >= 'a' && c <= 'f')
			v |= c - 'a' + 10;
		else if (c >= 'A' && c <= 'F')
			v |= c - 'A' + 10;
		else
			return -1;
	}
	return v;
}

/*
 * Replace the \uXXXX escapes of non-ASCII characters (and surrogate pairs)
 * in the strings of a JSON text by the characters themselves, in UTF-8.
 * The JSON means the same, and can then be converted to a database encoding
 * other than UTF-8 as a whole: PostgreSQL's JSON parser would convert each
 * escape alone, and throws when the encoding lacks the character.  Lone
 * surrogates are left for the parser to report.
 */
char *
eb_unescape_non_ascii(const char *s, size_t len, size_t *outlen)
{
	char	   *out = palloc(len + 1);
	size_t		o = 0;
	size_t		i = 0;
	bool		in_string = false;

	while (i < len)
	{
		if (s[i] == '"')
			in_string = !in_string;
		else if (in_string && s[i] == '\\' && i + 1 < len)
		{
			int			cp = (s[i + 1] == 'u' && i + 6 <= len) ? hex4(s + i + 2) : -1;
			size_t		used = 6;

			if (cp >= 0xD800 && cp <= 0xDBFF && i + 12 <= len &&
				s[i + 6] == '\\' && s[i + 7] == 'u')
			{
				int			lo = hex4(s + i + 8);

				if (lo >= 0xDC00 && lo <= 0xDFFF)
				{
					cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
					used = 12;
				}
			}
			if (cp >= 0x80 && !(cp >= 0xD800 && cp <= 0xDFFF))
			{
				unicode_to_utf8((pg_wchar) cp, (unsigned char *) out + o);
				o += pg_utf_mblen((unsigned char *) out + o);
				i += used;
				continue;
			}
			/* Any other escape: the backslash and the escaped byte as they are. */
			out[o++] = s[i++];
		}
		out[o++] = s[i++];
	}
	out[o] = '\0';
	*outlen = o;
	return out;
}

/*
 * Why numeric cannot hold the JSON number tok (anything not of the JSON
 * number syntax is left to the parser), or NULL; *growth is how many bytes
 * longer numeric_out writes it.
 */
const char *
eb_json_number_problem(const char *tok, size_t n, int64 *growth)
{
	size_t		i = 0;
	bool		neg = false;
	bool		nonzero = false;
	int64		int_digits = 0; /* significant digits before the point */
	int64		frac_digits = 0;
	int64		frac_zeros = 0; /* zeros after the point before a nonzero digit */
	int64		exp = 0;
	int64		dscale;
	int64		dweight = 0;

	*growth = 0;
	if (i < n && tok[i] == '-')
		neg = tok[i++] == '-';
	if (i >= n || !isdigit((unsigned char) tok[i]))
		return NULL;
	for (; i < n && isdigit((unsigned char) tok[i]); i++)
		if (nonzero || tok[i] != '0')
		{
			nonzero = true;
			int_digits++;
		}
	if (i < n && tok[i] == '.')
		for (i++; i < n && isdigit((unsigned char) tok[i]); i++)
		{
			frac_digits++;
			if (!nonzero && tok[i] == '0')
				frac_zeros++;
			else
				nonzero = true;
		}
	if (i < n && (tok[i] == 'e' || tok[i] == 'E'))
	{
		bool		exp_neg = false;

		i++;
		if (i < n && (tok[i] == '+' || tok[i] == '-'))
			exp_neg = tok[i++] == '-';
		for (; i < n && isdigit((unsigned char) tok[i]); i++)
			exp = Min(exp * 10 + (tok[i] - '0'), (int64) EXPONENT_LIMIT + 1);
		if (exp_neg)
			exp = -exp;
	}
	if (i != n)
		return NULL;
	if (exp > EXPONENT_LIMIT || exp < -EXPONENT_LIMIT)
		return "an exponent beyond 1000000";
	dscale = Max(frac_digits - exp, 0);
	if (dscale > NUMERIC_SCALE_LIMIT)
		return "more than 16383 digits after the decimal point";
	if (nonzero)
	{
		dweight = (int_digits > 0 ? int_digits - 1 : -(frac_zeros + 1)) + exp;
		if (dweight > NUMERIC_DWEIGHT_LIMIT)
			return "more than 131072 digits before the decimal point";
	}
	/* numeric_out: sign, every integer digit (or "0"), point and dscale digits */
	*growth = Max((neg ? 1 : 0) + (nonzero && dweight >= 0 ? dweight + 1 : 1) +
				  (dscale > 0 ? dscale + 1 : 0) - (int64) n, 0);
	return NULL;
}

/*
 * One pass over the JSON text before any parser sees it: the nesting depth
 * (PostgreSQL's JSON parser recurses per level and throws at the stack depth
 * limit), the numbers numeric cannot hold (numeric_in throws) and how much
 * they grow when written out, and the number of tokens (which bounds the
 * size of the jsonb).  Strings are skipped as the JSON lexer skips them, so
 * over any prefix the parser accepts, the depth seen here is the parser's.
 * Returns the reason when the nesting is too deep, else NULL.
 */
const char *
eb_json_prescan(const char *s, size_t len, EbJsonScan *scan)
{
	int			depth = 0;
	size_t		i = 0;

	memset(scan, 0, sizeof(EbJsonScan));
	while (i < len)
	{
		char		c = s[i];

		if (c == '"')
		{
			scan->tokens++;
			for (i++; i < len && s[i] != '"'; i++)
				if (s[i] == '\\')
					i++;
			i++;
		}
		else if (c == '[' || c == '{')
		{
			scan->tokens++;
			if (++depth > EB_MAX_JSON_DEPTH)
				return psprintf("message nests arrays and objects more than %d levels deep",
								EB_MAX_JSON_DEPTH);
			i++;
		}
		else if (c == ']' || c == '}')
		{
			if (depth > 0)
				depth--;
			i++;
		}
		else if (c == '-' || (c >= '0' && c <= '9'))
		{
			size_t		start = i;
			int64		growth;
			const char *problem;

			while (i < len && (isdigit((unsigned char) s[i]) || s[i] == '-' || s[i] == '+' ||
							   s[i] == '.' || s[i] == 'e' || s[i] == 'E'))
				i++;
			scan->tokens++;
			problem = eb_json_number_problem(s + start, i - start, &growth);
			scan->number_growth += growth;
			if (scan->number_problem == NULL)
				scan->number_problem = problem;
		}
		else
		{
			if (c == 't' || c == 'f' || c == 'n')
				scan->tokens++;
			i++;
		}
	}
	return NULL;
}

/* n decimal digits at s[*pos], advancing *pos. */
static bool
take_digits(const char *s, int len, int *pos, int n, int *out)
{
	int			v = 0;

	if (*pos + n > len)
		return false;
	for (int i = 0; i < n; i++)
	{
		char		c = s[*pos + i];

		if (c < '0' || c > '9')
			return false;
		v = v * 10 + (c - '0');
	}
	*pos += n;
	*out = v;
	return true;
}

/* One of the characters of allowed at s[*pos], advancing *pos. */
static bool
take_char(const char *s, int len, int *pos, const char *allowed)
{
	if (*pos >= len || s[*pos] == '\0' || strchr(allowed, s[*pos]) == NULL)
		return false;
	(*pos)++;
	return true;
}

/*
 * An RFC 3339 date-time, YYYY-MM-DDTHH:MM:SS[.fraction](Z|+HH:MM|-HH:MM)
 * ('t' or a space for 'T', 'z' for 'Z'), years 0001-9999 (what Go's
 * time.Time marshals), microseconds rounded half up; a leap second 60 is
 * the next minute's start.  Our own parser: timestamptz_in throws, and
 * accepts much that is not RFC 3339 (words like 'now', local times).
 */
bool
eb_parse_rfc3339(const char *s, int len, TimestampTz *out)
{
	int			pos = 0;
	int			y,
				mo,
				d,
				h,
				mi,
				sec,
				oh = 0,
				om = 0,
				sign = 0;
	int64		usec = 0;

	if (!take_digits(s, len, &pos, 4, &y) || !take_char(s, len, &pos, "-") ||
		!take_digits(s, len, &pos, 2, &mo) || !take_char(s, len, &pos, "-") ||
		!take_digits(s, len, &pos, 2, &d) || !take_char(s, len, &pos, "Tt ") ||
		!take_digits(s, len, &pos, 2, &h) || !take_char(s, len, &pos, ":") ||
		!take_digits(s, len, &pos, 2, &mi) || !take_char(s, len, &pos, ":") ||
		!take_digits(s, len, &pos, 2, &sec))
		return false;
	if (pos < len && s[pos] == '.')
	{
		int			ndigits = 0;

		for (pos++; pos < len && s[pos] >= '0' && s[pos] <= '9'; pos++, ndigits++)
		{
			if (ndigits < 6)
				usec = usec * 10 + (s[pos] - '0');
			else if (ndigits == 6 && s[pos] >= '5')
				usec++;
		}
		if (ndigits == 0)
			return false;
		for (int i = ndigits; i < 6; i++)
			usec *= 10;
	}
	if (!take_char(s, len, &pos, "Zz"))
	{
		if (pos >= len || (s[pos] != '+' && s[pos] != '-'))
			return false;
		sign = s[pos++] == '-' ? -1 : 1;
		if (!take_digits(s, len, &pos, 2, &oh) || !take_char(s, len, &pos, ":") ||
			!take_digits(s, len, &pos, 2, &om))
			return false;
	}
	if (pos != len || y < 1 || mo < 1 || mo > 12 || d < 1 || d > day_tab[isleap(y)][mo - 1] ||
		h > 23 || mi > 59 || sec > 60 || oh > 23 || om > 59)
		return false;
	*out = ((int64) (date2j(y, mo, d) - POSTGRES_EPOCH_JDATE) * SECS_PER_DAY +
			h * SECS_PER_HOUR + mi * SECS_PER_MINUTE + sec -
			sign * (oh * SECS_PER_HOUR + om * SECS_PER_MINUTE)) * USECS_PER_SEC + usec;
	return true;
}
