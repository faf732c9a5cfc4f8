/* fileio.h: how palign opens, maps and replaces whole files.
 *
 *  - pa_map_file: a whole regular file mapped read-only (model files: GGUF,
 *    safetensors), with errors that name the file; pa_open_regular opens
 *    one for reading, refusing anything that is not a regular file (a FIFO
 *    planted in a store would otherwise block its reader for ever).
 *  - pa_write_atomic: a file written under a temporary name beside its final
 *    path, flushed to disk, then renamed into place, so a reader (or a crash)
 *    sees either the old file or the complete new one, never a torn one; the
 *    directory is synced after the rename, so the new file is the one that
 *    survives a crash (pa_sync_dir).
 *
 * Errors: 0 or a negative PA_E* code with a message (status.h). Both are
 * thread-safe (temporary names are unique per process and call).
 */
#ifndef PALIGN_FILEIO_H
#define PALIGN_FILEIO_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef struct {
  const uint8_t *data; /* NULL for an empty file */
  uint64_t size;
} pa_mapped;

/* Opens `path` for reading if it is a regular file: the descriptor (>= 0,
 * its size in *size), or PA_ENOTFOUND if it does not exist and PA_EIO if it
 * cannot be opened or is something else. A FIFO or a device is refused
 * without blocking (it is opened O_NONBLOCK, which regular files ignore). */
int pa_open_regular(const char *path, uint64_t *size);

/* Maps `path`; PA_ENOTFOUND if it does not exist, PA_EIO if it cannot be
 * opened or is not a regular file, PA_EFORMAT ("truncated") if it is shorter
 * than min_size bytes, where `what` names what needs them ("a GGUF header"). */
int pa_map_file(const char *path, uint64_t min_size, const char *what, pa_mapped *out);
void pa_unmap_file(pa_mapped *m); /* accepts an unmapped (zeroed) one */

/* One piece of the content of a file being written. */
typedef struct {
  const void *data;
  size_t len;
} pa_chunk;

/* Writes the concatenation of chunks[0..n) to `path` atomically. What is
 * at path must be a regular file (or nothing): a device, a FIFO or a link
 * to one is PA_EINVAL, since renaming over it would replace the node, not
 * write to it. A link to a file is followed (the file replaced, the link
 * kept), and a file's permissions are kept. */
int pa_write_atomic(const char *path, const pa_chunk *chunks, size_t n);

/* Whether path, or where it would be created (its folder, when nothing is
 * there yet), is dir or inside it, links followed. False when either cannot
 * be resolved. */
bool pa_path_within(const char *path, const char *dir);

/* fsyncs a directory, so that names just created, renamed or removed in it
 * survive a crash (file systems that cannot sync a directory are let be). */
int pa_sync_dir(const char *dir);

#endif
