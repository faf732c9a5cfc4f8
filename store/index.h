/* index.h: STORE/index.pb, where every subject's record is, so that
 * `palign query STORE subject ID` reads one record instead of every shard.
 *
 * Written on demand (`palign query STORE index`), from the shards as they
 * are: the first valid record of every subject, as the readers take it, and
 * every shard file's name, size and modification time. Never trusted over
 * the shards: a lookup uses it only while the shard files are exactly those
 * it lists (a run that appended, a new shard, a rewrite: stale), and checks
 * the record it points to (frame, checksum, subject id); anything else and
 * the caller reads the shards as without an index. Deleting it is always
 * safe. */
#ifndef PALIGN_INDEX_H
#define PALIGN_INDEX_H

#include "palign.pb-c.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* Writes STORE/index.pb atomically; *n_entries and *bytes when not NULL. */
int pa_index_build(const char *store, size_t *n_entries, uint64_t *bytes);

typedef enum { PA_INDEX_NONE, PA_INDEX_UNREADABLE, PA_INDEX_STALE, PA_INDEX_CURRENT } pa_index_state;

/* Whether STORE/index.pb is there, an index this palign reads (UNREADABLE:
 * damaged, or another format), and matches the shard files; when current,
 * *out is the index (free with palign__store_index__free_unpacked). */
pa_index_state pa_index_check(const char *store, Palign__StoreIndex **out);

/* Subject id through a current index: *used true and *out its record when
 * the index holds it and the record checks out; otherwise *used false (no
 * index, a stale one, a subject it does not hold, a record that does not
 * check) and the caller reads the shards. Returns PA_OK, or an error
 * only for out of memory. */
int pa_index_lookup(const char *store, const char *id, Palign__SubjectResult **out, bool *used);

#endif
