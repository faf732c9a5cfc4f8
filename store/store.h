/* store.h: the store, a directory of shard files and a manifest
 * (docs/STORE.md).
 *
 *   STORE/manifest.pb          Palign__Manifest, replaced atomically (fileio.h)
 *   STORE/shards/run<R>-rank<K>.pal
 *                              the records worker rank K wrote during run R
 *   STORE/bank-<fp16>.bin      the PAS activation bank cache (bank.h)
 *
 * A shard is a sequence of records, each
 *
 *   "PAR1" | u32 length | u32 crc32 | length bytes: a Palign__SubjectResult
 *
 * (integers little-endian; crc32 is zlib's, of the payload). Every run writes
 * new shard files, one per worker rank, only ever appending, and each record
 * is flushed to disk (fsync) before the worker reports the subject done. So a
 * killed job leaves at worst one torn record at the end of a shard; readers
 * detect it (short frame, bad checksum) and skip it, and the subject it held
 * counts as not done. A damaged record in the middle (flipped bytes) is
 * skipped the same way: its frame's length, if plausible, leads to the next
 * record; otherwise the reader searches forward for the next "PAR1" whose
 * checksum holds.
 *
 * A subject is stored at most once: the coordinator hands each subject out
 * once per run and skips those with a valid record. Should two valid records
 * of one subject ever meet (shards copied together by hand), readers keep the
 * first in reading order (shards by run, rank and part as numbers, so run9
 * before run10; then offset) and report the others as duplicates.
 *
 * Errors: 0 or a negative PA_E* code with a message naming the file and the
 * problem (status.h). Nothing here changes a record once written.
 */
#ifndef PALIGN_STORE_H
#define PALIGN_STORE_H

#include "palign.pb-c.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define PA_STORE_FORMAT      1
#define PA_STORE_MAX_RECORD  (64u << 20) /* a frame claiming more is damaged */
#define PA_STORE_RECORD_HEAD 12          /* magic, length, crc32 */

/* ---- the manifest --------------------------------------------------------- */

/* Reads STORE/manifest.pb. PA_ENOTFOUND if there is none (a new store);
 * PA_EFORMAT naming the file if it does not unpack or its format is not
 * PA_STORE_FORMAT (PA_EUNSUPPORTED for a newer one). Free with
 * palign__manifest__free_unpacked(m, NULL). */
int pa_manifest_read(const char *store, Palign__Manifest **out);

/* Packs m and replaces STORE/manifest.pb atomically (creating STORE and
 * STORE/shards if missing). */
int pa_manifest_write(const char *store, const Palign__Manifest *m);

/* Whether a run with settings `want` may add to a store made with `have`:
 * PA_OK, or PA_EINVAL with a message naming every field that differs (model
 * fingerprint, inventory fingerprint, methods, mode, seed, ...). */
int pa_settings_check(const char *store, const Palign__Settings *have, const Palign__Settings *want);
/* The same comparison under another heading ("STORE: this store was made
 * with other settings:" above), each clause "name 'have' here, 'want'
 * THERE" (THERE: "asked" above). */
int pa_settings_compare(const char *heading, const char *there, const Palign__Settings *have,
                        const Palign__Settings *want);

/* ---- a run's hold on the store ------------------------------------------- */

typedef struct pa_store_guard pa_store_guard;

/* Takes STORE/lock (created, with STORE, if missing) for a run that writes:
 * an fcntl write lock, which the system drops when the process ends however
 * it ends. A store another process holds is refused with PA_EINVAL naming
 * the store and the holder's pid. */
int pa_store_lock(const char *store, pa_store_guard **out);
void pa_store_unlock(pa_store_guard *l); /* accepts NULL */

/* The number the next run gets: one more than the runs the manifest m
 * (NULL: none) records and than any run<R> among STORE/shards' files, so
 * that a run never meets a shard name already used. */
int pa_store_next_run(const char *store, const Palign__Manifest *m, int *run);

/* ---- writing ---------------------------------------------------------------- */

/* "run<R>-rank<K>.pal" into buf; returns buf. */
const char *pa_shard_name(int run, int rank, char buf[64]);

typedef struct pa_shard_writer pa_shard_writer;

/* Where a shard's next part begins: a record that would take a part past
 * this many bytes starts a new part file instead, so that no file grows
 * without bound (a part may be larger only by holding one record larger
 * than the limit). */
#define PA_STORE_SHARD_BYTES (256ull << 20)

/* Part `part` of a shard: part 1 is pa_shard_name's "run<R>-rank<K>.pal",
 * later ones "run<R>-rank<K>.p<part>.pal"; returns buf. */
const char *pa_shard_part_name(int run, int rank, int part, char buf[64]);

/* The shard a file belongs to ("run3-rank1.p2.pal" -> "run3-rank1.pal");
 * any other name as it is. The manifest lists shards by their first part. */
const char *pa_shard_part_base(const char *name, char buf[64]);

/* Creates STORE/shards/<pa_shard_name(run, rank)> for appending; a file of
 * that name already there is an error (runs never share a shard). Its parts
 * begin at PA_STORE_SHARD_BYTES unless pa_shard_set_limit says otherwise. */
int pa_shard_open(const char *store, int run, int rank, pa_shard_writer **out);
void pa_shard_set_limit(pa_shard_writer *w, uint64_t bytes); /* 0: PA_STORE_SHARD_BYTES */

/* Packs r, writes one record and fsyncs it, beginning the shard's next part
 * first when this one is full. On error (disk full) the shard may end in a
 * torn record, which readers skip. */
int pa_shard_append(pa_shard_writer *w, const Palign__SubjectResult *r);

/* Frames a packed payload into a record (buf must hold
 * PA_STORE_RECORD_HEAD + len bytes); returns the record's size. For tests
 * and tools that write shards. */
size_t pa_record_frame(const uint8_t *payload, uint32_t len, uint8_t *buf);

int pa_shard_close(pa_shard_writer *w); /* accepts NULL; reports a failed close */
/* Closes w (accepts NULL) and removes its file when nothing was ever
 * appended to it: a run that never started leaves no shard behind. */
int pa_shard_discard(pa_shard_writer *w);

/* ---- reading ---------------------------------------------------------------- */

typedef enum {
  PA_RECORD_OK = 0,
  PA_RECORD_TORN,      /* the shard ends inside this record (a killed writer) */
  PA_RECORD_CHECKSUM,  /* the payload does not match its crc32 */
  PA_RECORD_FRAME,     /* no valid frame here (bad magic or length): bytes skipped */
  PA_RECORD_PROTOBUF,  /* the checksum holds but the payload is not a SubjectResult */
  PA_RECORD_DUPLICATE, /* a valid record of a subject already seen */
} pa_record_status;

const char *pa_record_status_str(pa_record_status s); /* "ok", "torn", ... */

typedef struct {
  const char *shard; /* file name under STORE/shards */
  uint64_t offset;   /* of the record (or the skipped bytes) in the shard */
  uint64_t length;   /* the whole record's (or the skipped bytes') size */
  pa_record_status status;
  char subject_id[64]; /* from the payload where it unpacked, else "" */
} pa_record_info;

/* Called once per record or damaged stretch, in (shard name, offset) order.
 * r is the unpacked record for PA_RECORD_OK, else NULL (for a duplicate too);
 * it is freed after the call returns. Returning non-zero stops the reading
 * and pa_store_read returns that value. */
typedef int (*pa_store_visit)(void *ctx, const pa_record_info *info, const Palign__SubjectResult *r);

/* The record whose frame is at offset (length bytes, head included) of
 * STORE/shards/<shard>: PA_OK and *out (free with
 * palign__subject_result__free_unpacked), or PA_EFORMAT when no valid record
 * is there (damage, a wrong offset), PA_EIO/PA_ENOTFOUND when the file
 * cannot be read. */
int pa_store_record_at(const char *store, const char *shard, uint64_t offset, uint64_t length,
                       Palign__SubjectResult **out);

/* The shard files of the store, in reading order (names under
 * STORE/shards, malloc'd, as is the array); none when there are none. */
int pa_store_shards(const char *store, char ***names, size_t *n);

/* Visits every record of every shard of the store (the files STORE/shards/<name>.pal, in
 * run, rank and part order; see cmp_names). Damage in a shard is reported to visit, not as an
 * error; errors are a missing store (PA_ENOTFOUND), unreadable files (PA_EIO)
 * and out of memory. Counts go to counts[status] if counts is not NULL. */
int pa_store_read(const char *store, pa_store_visit visit, void *ctx, size_t counts[6]);

#endif
