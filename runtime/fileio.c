/* realpath is an X/Open function */
#define _XOPEN_SOURCE 700

#include "fileio.h"

#include "status.h"

#include <errno.h>
#include <fcntl.h>
#include <libgen.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

int pa_open_regular(const char *path, uint64_t *size) {
  const int fd = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK);
  if (fd < 0) {
    const int e = errno;
    return pa_error(e == ENOENT ? PA_ENOTFOUND : PA_EIO, "%s: cannot open: %s", path, strerror(e));
  }
  struct stat st;
  if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    close(fd);
    return pa_error(PA_EIO, "%s: not a regular file", path);
  }
  *size = (uint64_t)st.st_size;
  return fd;
}

int pa_map_file(const char *path, uint64_t min_size, const char *what, pa_mapped *out) {
  out->data = NULL;
  out->size = 0;
  uint64_t size;
  const int fd = pa_open_regular(path, &size);
  if (fd < 0)
    return fd;
  int rc = PA_OK;
  if (size < min_size) {
    rc = pa_error(PA_EFORMAT, "%s: truncated: %llu bytes is shorter than %s", path, (unsigned long long)size, what);
  } else if (size > 0) {
    void *m = mmap(NULL, (size_t)size, PROT_READ, MAP_PRIVATE, fd, 0);
    if (m == MAP_FAILED) {
      rc = pa_error(PA_EIO, "%s: cannot map %llu bytes: %s", path, (unsigned long long)size, strerror(errno));
    } else {
      out->data = m;
      out->size = size;
    }
  }
  close(fd);
  return rc;
}

void pa_unmap_file(pa_mapped *m) {
  if (m->data)
    munmap((void *)m->data, (size_t)m->size);
  m->data = NULL;
  m->size = 0;
}

bool pa_path_within(const char *path, const char *dir) {
  char *d = realpath(dir, NULL), *p = realpath(path, NULL);
  if (!p && errno == ENOENT) { /* not there yet: where it would be */
    char *copy = strdup(path);
    p = copy ? realpath(dirname(copy), NULL) : NULL;
    free(copy);
  }
  const size_t n = d ? strlen(d) : 0;
  const bool within = d && p && !strncmp(p, d, n) && (p[n] == '/' || p[n] == 0 || !strcmp(d, "/"));
  free(d), free(p);
  return within;
}

int pa_write_atomic(const char *path, const pa_chunk *chunks, size_t n) {
  static atomic_uint counter;
  /* What is there must be a file: renaming over a device, a FIFO or a link
   * to one (/dev/stdout) would replace that node, not write to it. A link
   * to a file is followed, so the file is replaced and the link kept; the
   * file's permissions are kept too. */
  struct stat st, lst;
  const bool existed = stat(path, &st) == 0;
  if (existed && !S_ISREG(st.st_mode))
    return pa_error(PA_EINVAL, "%s: not a regular file (it would be replaced whole; name a file or a new path)", path);
  char *real = NULL;
  if (existed && lstat(path, &lst) == 0 && S_ISLNK(lst.st_mode)) {
    if (!(real = realpath(path, NULL)))
      return pa_error(PA_EIO, "%s: cannot follow the link: %s", path, strerror(errno));
    path = real;
  }
  const size_t tlen = strlen(path) + 32;
  char *tmp = malloc(tlen);
  if (!tmp) {
    free(real);
    return pa_error(PA_ENOMEM, "%s: no memory", path);
  }
  snprintf(tmp, tlen, "%s.tmp%d.%u", path, (int)getpid(), atomic_fetch_add(&counter, 1u));
  int rc = PA_OK;
  FILE *f = fopen(tmp, "wb");
  if (!f) {
    rc = pa_error(PA_EIO, "%s: cannot create: %s", tmp, strerror(errno));
  } else {
    bool ok = true;
    for (size_t i = 0; ok && i < n; i++)
      ok = chunks[i].len == 0 || fwrite(chunks[i].data, 1, chunks[i].len, f) == chunks[i].len;
    ok = fflush(f) == 0 && ok;
    ok = (!existed || fchmod(fileno(f), st.st_mode & 07777) == 0) && ok;
    /* the rename must not reach the disk before the data does, or a crash
     * leaves a complete-looking file full of zeros */
    ok = fsync(fileno(f)) == 0 && ok;
    ok = fclose(f) == 0 && ok;
    if (!ok)
      rc = pa_error(PA_EIO, "%s: write failed: %s", tmp, strerror(errno));
    else if (rename(tmp, path) != 0)
      rc = pa_error(PA_EIO, "%s: cannot rename into place: %s", path, strerror(errno));
    if (rc)
      unlink(tmp);
  }
  if (!rc) { /* the rename itself is durable once the directory is */
    const char *slash = strrchr(path, '/');
    if (!slash) {
      rc = pa_sync_dir(".");
    } else if (slash == path) {
      rc = pa_sync_dir("/");
    } else {
      snprintf(tmp, tlen, "%.*s", (int)(slash - path), path);
      rc = pa_sync_dir(tmp);
    }
  }
  free(tmp);
  free(real);
  return rc;
}

int pa_sync_dir(const char *dir) {
  int fd = open(dir, O_RDONLY | O_CLOEXEC);
  if (fd < 0)
    return pa_error(PA_EIO, "%s: cannot open the directory: %s", dir, strerror(errno));
  int rc = PA_OK;
  if (fsync(fd) != 0 && errno != EINVAL) /* some file systems cannot sync a directory */
    rc = pa_error(PA_EIO, "%s: cannot sync the directory: %s", dir, strerror(errno));
  close(fd);
  return rc;
}
