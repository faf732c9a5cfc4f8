/* jsonfile.h: reading whole files, and JSON files, with errors people can act on.
 *
 * Errors: 0 or a negative PA_E* code with a message naming the file
 * (status.h): PA_ENOTFOUND for a missing file, PA_EIO for one that cannot be
 * read, PA_EFORMAT for one over the size limit, empty, or not JSON (with the
 * line and column of the problem, since these files are often edited by
 * hand). Thread-safe. */
#ifndef PALIGN_JSONFILE_H
#define PALIGN_JSONFILE_H

#include <cJSON.h>

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* The whole file, NUL-terminated, in *out (malloc'd); at most `max` bytes. */
int pa_read_file(const char *path, uint64_t max, char **out, size_t *len);

/* Parses a whole JSON file (up to 1 GiB; only whitespace may follow the
 * value). The caller owns *out (cJSON_Delete). */
int pa_json_load(const char *path, cJSON **out);

/* o as JSON text (indented when formatted), valid UTF-8 whatever bytes its
 * strings hold (those that are not UTF-8 become U+FFFD: pa_utf8_repair);
 * malloc'd, free() it; NULL when out of memory. */
char *pa_json_print(const cJSON *o, bool formatted);

#endif
