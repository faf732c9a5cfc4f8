/* query.h: reading a whole store back for people (`palign query`).
 *
 *  - pa_query_summarise: the per-row metrics table, failures, PAS alpha
 *    choices and costs over every valid record of a store;
 *  - pa_query_subject: one subject's record;
 *  - pa_query_export: one line per subject and MethodRow, as CSV or JSON;
 *  - pa_query_verify: everything that is wrong with a store.
 *
 * Every function reads the shards once through pa_store_read (store.h) and
 * keeps no whole record: memory grows with the number of records only by one
 * pa_subject_metrics per (record, row), which is what the table needs
 * (pa_metrics_summarise), and the export streams.
 *
 * Damaged records (any pa_record_status other than ok) are never used; each
 * one is reported to a pa_query_problem_fn as one line naming the shard and
 * the offset:
 *
 *   run1-rank1.pal offset 1234: checksum
 *
 * A damaged stretch cannot say whose record it was; only a duplicate's line
 * ends with the subject ("run2-rank1.pal offset 0: duplicate (subject s17)").
 *
 * The rows a store's records carry are kept in the order first seen; a
 * record of a failed subject (SubjectResult.failed) and a failed method
 * contribute no rows, only to the failure counts. A missing or damaged
 * MethodRow.metrics reads as a row with no scored item (all NaN).
 *
 * Errors: 0 or a negative PA_E* code with a message naming the store and the
 * problem (status.h): PA_ENOTFOUND when the store does not exist (or, for
 * pa_query_subject, holds no valid record of the subject), PA_EINVAL when the
 * path is not a store (not a directory, or one with neither manifest.pb nor
 * shards/), PA_EIO for unreadable files or a failed write, PA_ENOMEM.
 * Not thread-safe across calls that share a result object; otherwise
 * reentrant.
 */
#ifndef PALIGN_QUERY_H
#define PALIGN_QUERY_H

#include "metrics.h"
#include "palign.pb-c.h"
#include "store.h"

#include <cJSON.h>
#include <stdint.h>
#include <stdio.h>

#define PA_QUERY_MAX_LISTED 5 /* failures listed by id in a summary; all are counted */

/* Called with one problem line (no newline); the line lives until the call
 * returns. */
typedef void (*pa_query_problem_fn)(void *ctx, const char *line);

/* "SHARD offset N: STATUS (subject X)" (the subject part only where known)
 * into buf; returns buf. */
const char *pa_query_record_problem(const pa_record_info *info, char *buf, size_t n);

/* 0 when `store` is a directory that looks like a store (manifest.pb or
 * shards/ inside), else PA_ENOTFOUND or PA_EINVAL with a message naming it. */
int pa_query_check_store(const char *store);

/* ---- summary ---------------------------------------------------------------- */

typedef struct {
  char name[64];               /* MethodRow.name */
  pa_subject_metrics *metrics; /* [n], one per record carrying the row */
  int n, cap;
  pa_method_summary summary; /* pa_metrics_summarise(metrics, n) */
} pa_query_row;

typedef struct {
  char name[64]; /* MethodResult.method */
  int runs;      /* records where it did not fail */
  int failed;
  double seconds; /* sums of Cost over runs */
  int64_t tokens, full_prompt_tokens, reference_way_tokens, prompts;
} pa_query_method;

typedef struct {
  double alpha;
  int count;
} pa_query_alpha;

/* How often each alpha was chosen for one variant under one protocol. */
typedef struct {
  char variant[32], protocol[32]; /* PasChoice.variant, .protocol */
  pa_query_alpha *alphas;         /* [n_alphas], ascending alpha */
  int n_alphas, cap;
  int none; /* choices with index -1 (nothing fitted) */
} pa_query_choice;

typedef struct {
  char subject[64];
  char method[64]; /* "" when the whole subject failed */
  char error[256];
} pa_query_failure;

typedef struct {
  char status[32]; /* PasResult.status */
  int count;
} pa_query_status;

typedef struct {
  const char *store;
  /* The manifest, or NULL with the reason in manifest_error (missing,
   * does not unpack, other format). Owned; freed by pa_query_summary_free. */
  Palign__Manifest *manifest;
  char manifest_error[512];

  size_t counts[6]; /* records by pa_record_status */
  size_t skipped;   /* damaged records: counts[1..5] */
  size_t subjects;  /* valid records of subjects that were done */
  size_t subjects_failed;
  size_t methods_failed;
  double subject_seconds; /* sum of SubjectResult.seconds over `subjects` */

  pa_query_row *rows; /* [n_rows], first-seen order, summaries filled */
  int n_rows;
  pa_query_method *methods; /* [n_methods], first-seen order */
  int n_methods;

  int pas_fitted;             /* records with PAS status "fitted" */
  pa_query_status *pas_other; /* [n_pas_other]: other PAS statuses and their counts */
  int n_pas_other;
  double pas_fit_seconds;  /* sums over the fitted ones */
  Palign__Cost pas_grid;   /* sums of PasResult.grid_cost over the fitted ones (no allocations) */
  pa_query_choice *chosen; /* [n_chosen], first-seen (variant, protocol) order */
  int n_chosen;

  /* DPO: sums over the records with a trained adapter */
  int dpo_trained;
  double dpo_ref_seconds, dpo_train_seconds, dpo_ref_flops, dpo_train_flops;
  double dpo_ref_tokens, dpo_train_tokens, dpo_steps, dpo_pairs;
  double dpo_first_loss, dpo_last_epoch_loss; /* of loss[0] and of the last epoch's mean */
  int64_t dpo_max_trainer_bytes;

  /* the first PA_QUERY_MAX_LISTED of each kind, in reading order */
  pa_query_failure failed_subjects[PA_QUERY_MAX_LISTED];
  pa_query_failure failed_methods[PA_QUERY_MAX_LISTED];
} pa_query_summary;

/* Reads the manifest and every record of `store` into *out (zeroed first;
 * free with pa_query_summary_free even on error). problem, if not NULL, gets
 * each damaged record. A missing or unreadable manifest is not an error
 * here: it is described in out->manifest_error. */
int pa_query_summarise(const char *store, pa_query_problem_fn problem, void *ctx, pa_query_summary *out);
void pa_query_summary_free(pa_query_summary *s);

/* The summary as a JSON object (owned by the caller; NaN as null). */
cJSON *pa_query_summary_json(const pa_query_summary *s);

/* ---- one subject --------------------------------------------------------------- */

/* The first valid record of subject `id` (in the store's reading order), as
 * its own message: free with palign__subject_result__free_unpacked(r, NULL).
 * PA_ENOTFOUND naming the subject and the store if there is none. */
int pa_query_subject(const char *store, const char *id, Palign__SubjectResult **out);

/* Any stored message as JSON, every field by its proto name: 64-bit integers
 * beyond 2^53 as decimal strings, bytes as arrays of numbers, NaN as null. */
cJSON *pa_query_message_json(const ProtobufCMessage *m);

/* The alpha the record's PAS fit chose for a row named "VARIANT (PROTOCOL)"
 * (e.g. "pas (holdout)"); NaN when the row is not such a row or nothing was
 * chosen. */
double pa_query_row_alpha(const Palign__SubjectResult *r, const char *row);

/* ---- export ------------------------------------------------------------------- */

typedef enum { PA_QUERY_CSV, PA_QUERY_JSON, PA_QUERY_RECORDS } pa_query_format;

/* Writes one line (CSV, with a header) or object (JSON, in one array) per
 * valid record and MethodRow to f:
 *
 *   subject_id, method, row, mae_A, mae_C, mae_E, mae_N, mae_O, mae_sum,
 *   n_scored, n_unknown, alpha, seconds
 *
 * (n_* summed over traits; alpha for PAS rows as pa_query_row_alpha; seconds
 * the method's Cost.seconds.) NaN is an empty field in CSV and null in JSON.
 * Numbers are printed to round-trip.
 *
 * PA_QUERY_RECORDS instead writes every valid record whole, failed ones
 * too, as pa_query_message_json, one JSON object a line (JSON Lines), for
 * scripts that want everything in one pass (scripts/plot-store.py); a row is
 * then a record.
 *
 * *rows gets the number of rows written if not NULL. PA_EIO if writing to f
 * fails. */
int pa_query_export(const char *store, pa_query_format fmt, FILE *f, pa_query_problem_fn problem, void *ctx,
                    size_t *rows);

/* ---- verify ------------------------------------------------------------------- */

typedef struct {
  size_t counts[6];       /* records by pa_record_status */
  size_t records_ok;      /* counts[PA_RECORD_OK] */
  size_t subjects_failed; /* valid records of failed subjects */
  size_t mismatched;      /* valid records whose fingerprint or seed is not the manifest's */
  size_t shards;          /* shard files found */
  int64_t subjects_total; /* Manifest.subjects_total, -1 without a manifest */
  size_t problems;        /* every line given to problem */
} pa_query_verify_result;

/* Checks the manifest (present, unpacks, format), every record, the shard
 * files against Manifest.shards (listed but missing, present but not
 * listed) and every valid record's model fingerprint and run seed against
 * Manifest.settings. Each problem goes to problem as one line. Returns 0 when
 * the store could be checked (clean or not: see out->problems), or an error
 * when it could not be read at all. */
int pa_query_verify(const char *store, pa_query_problem_fn problem, void *ctx, pa_query_verify_result *out);

#endif
