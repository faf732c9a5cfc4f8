// cuda_profile.cu: the device's time by operation (pa_cuda_profile,
// PALIGN_CUDA_PROFILE).
//
// With the profile on, each operation's work on the stream lies between two
// timing events, a span, under a name: the operation's, and a product's
// weight shape (N x K) with it; an upload has a span for each copy it
// queues (a chunk of the staging ring), so that the host's copying into
// the ring is not the copy's time. The spans wait in a pool of kProfSpans;
// when it is full, and when the profile is read, the host waits for the
// last one and adds each span's time to its name's row, and the time from
// a span's end to the next one's start to the idle figure: the device
// waiting for the host's work and waits between operations (an operation's
// own launch, where the device waits for it, is in its span). So the
// profile costs two event records a span, and a wait for each kProfSpans
// of them (counted in host_waits). Spans do not nest; names beyond
// kProfRows share the last row.
#include "cuda_internal.cuh"

#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

namespace palign_cuda {

struct prof_span {
  cudaEvent_t begin, end;
  int row;
  double flops, bytes;
};

bool profiling;

namespace {

#ifdef PA_PROF_SPANS
constexpr int kProfSpans = PA_PROF_SPANS;
#else
constexpr int kProfSpans = 4096;
#endif
constexpr int kProfRows = 64;

bool prof_open_span;  // a span is open: an operation inside another is the outer one's
prof_span *prof_pool; // kProfSpans, their events made when the profile starts
int prof_used;
cudaEvent_t prof_last; // the last harvested span's end, where prof_have_last
bool prof_have_last;
pa_cuda_profile_row prof_rows[kProfRows];
int prof_n_rows;
double prof_idle_ms;
char prof_name_buf[kProfNameBytes]; // a name being formatted (prof_name)

int prof_row(const char *name) {
  for (int r = 0; r < prof_n_rows; r++)
    if (!strcmp(prof_rows[r].name, name))
      return r;
  if (prof_n_rows == kProfRows)
    return kProfRows - 1;
  pa_cuda_profile_row *row = &prof_rows[prof_n_rows];
  snprintf(row->name, sizeof row->name, "%s", prof_n_rows == kProfRows - 1 ? "(other operations)" : name);
  return prof_n_rows++;
}

// The pool's spans into the rows, the host waiting for the last; false on
// an error (the pool's spans not yet counted then dropped).
bool prof_harvest() {
  if (!prof_used)
    return true;
  host_waits++;
  bool ok = check(cudaEventSynchronize(prof_pool[prof_used - 1].end), "profile");
  for (int i = 0; ok && i < prof_used; i++) {
    const prof_span &sp = prof_pool[i];
    float ms = 0.0f, gap = 0.0f;
    const bool after = i > 0 || prof_have_last;
    ok = check(cudaEventElapsedTime(&ms, sp.begin, sp.end), "profile") &&
         (!after || check(cudaEventElapsedTime(&gap, i > 0 ? prof_pool[i - 1].end : prof_last, sp.begin), "profile"));
    if (!ok)
      break;
    prof_rows[sp.row].spans++;
    prof_rows[sp.row].ms += ms;
    prof_rows[sp.row].flops += sp.flops;
    prof_rows[sp.row].bytes += sp.bytes;
    prof_idle_ms += gap > 0.0f ? gap : 0.0f;
  }
  if (!ok) {
    prof_used = 0, prof_have_last = false;
    return false;
  }
  // the last end stays, as the next span's predecessor; its old handle goes back to the pool
  const cudaEvent_t last = prof_pool[prof_used - 1].end;
  prof_pool[prof_used - 1].end = prof_last;
  prof_last = last, prof_have_last = true;
  prof_used = 0;
  return true;
}

void prof_close() {
  if (!prof_pool)
    return;
  for (int i = 0; i < kProfSpans; i++)
    for (cudaEvent_t e : {prof_pool[i].begin, prof_pool[i].end})
      if (e)
        cudaEventDestroy(e);
  if (prof_last)
    cudaEventDestroy(prof_last);
  cudaGetLastError(); // not left for the next launch's check
  free(prof_pool);
  prof_pool = nullptr, prof_last = nullptr, prof_used = 0, prof_have_last = false;
}

bool prof_open() {
  prof_pool = (prof_span *)calloc(kProfSpans, sizeof *prof_pool);
  if (!prof_pool) {
    snprintf(last_error, sizeof last_error, "profile: no host memory for %d spans", kProfSpans);
    return false;
  }
  bool ok = cudaEventCreateWithFlags(&prof_last, cudaEventDefault) == cudaSuccess;
  for (int i = 0; ok && i < kProfSpans; i++)
    ok = cudaEventCreateWithFlags(&prof_pool[i].begin, cudaEventDefault) == cudaSuccess &&
         cudaEventCreateWithFlags(&prof_pool[i].end, cudaEventDefault) == cudaSuccess;
  if (!ok) {
    snprintf(last_error, sizeof last_error, "profile: cannot make %d timing events: %s", 2 * kProfSpans + 1,
             cudaGetErrorString(cudaGetLastError()));
    prof_close();
    return false;
  }
  return true;
}

} // namespace

const char *prof_name(const char *fmt, ...) {
  if (!profiling)
    return nullptr;
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(prof_name_buf, sizeof prof_name_buf, fmt, ap);
  va_end(ap);
  return prof_name_buf;
}

prof_span *span_begin(const char *name, double flops, double bytes) {
  if (!profiling || !name || prof_open_span || (prof_used == kProfSpans && !prof_harvest()))
    return nullptr;
  prof_span &sp = prof_pool[prof_used];
  sp.row = prof_row(name), sp.flops = flops, sp.bytes = bytes;
  if (!check(cudaEventRecord(sp.begin, stream), "profile"))
    return nullptr;
  prof_open_span = true;
  return &sp;
}

void span_end(prof_span *sp) {
  prof_open_span = false;
  if (check(cudaEventRecord(sp->end, stream), "profile"))
    prof_used++;
}

namespace {

// PALIGN_CUDA_PROFILE's file ("-": standard error; "%p" in it: the
// process's id), the table appended to it at exit in one write, so that
// the ranks of a run on one machine sharing the file do not interleave
// their lines (across machines on a shared file system they may: "%p"
// gives each its own file).
char *profile_path;

constexpr size_t kProfilePathMax = 4000; // characters of PALIGN_CUDA_PROFILE: room for the pids of its "%p"s

void profile_at_exit() {
  char path[2 * kProfilePathMax + 16];
  size_t at = 0;
  for (const char *c = profile_path; *c; c++)
    if (c[0] == '%' && c[1] == 'p')
      at += (size_t)snprintf(path + at, sizeof path - at, "%d", (int)getpid()), c++;
    else
      path[at++] = *c;
  path[at] = '\0';
  char *text = nullptr;
  size_t len = 0;
  FILE *mem = open_memstream(&text, &len);
  if (!mem) {
    fprintf(stderr, "palign: PALIGN_CUDA_PROFILE: no memory for the table: %s\n", strerror(errno));
    return;
  }
  pa_cuda_profile_write(mem);
  fclose(mem);
  const int fd = strcmp(path, "-") ? open(path, O_WRONLY | O_APPEND | O_CREAT, 0644) : 2;
  if (fd < 0 || write(fd, text, len) != (ssize_t)len)
    fprintf(stderr, "palign: PALIGN_CUDA_PROFILE: cannot write %s: %s\n", path, strerror(errno));
  if (fd > 2)
    close(fd);
  free(text);
}

// The rows by device time, the longest first, for qsort (std::sort's
// instantiations would be exported from the library as weak symbols).
int by_time(const void *a, const void *b) {
  const double x = ((const pa_cuda_profile_row *)a)->ms, y = ((const pa_cuda_profile_row *)b)->ms;
  return (x < y) - (x > y);
}

} // namespace

// The profile on when PALIGN_CUDA_PROFILE names a file (set and empty: as unset), once a process.
int profile_from_env() {
  const char *path = getenv("PALIGN_CUDA_PROFILE");
  if (!path || !*path || profile_path)
    return 0;
  if (strlen(path) > kProfilePathMax) {
    snprintf(last_error, sizeof last_error, "PALIGN_CUDA_PROFILE: a name of %zu characters (at most %zu)", strlen(path),
             kProfilePathMax);
    return -1;
  }
  if (pa_cuda_profile(1) != 0)
    return -1;
  if (!(profile_path = strdup(path)) || atexit(profile_at_exit) != 0) {
    snprintf(last_error, sizeof last_error, "PALIGN_CUDA_PROFILE: cannot arrange the report at exit");
    return -1;
  }
  return 0;
}

} // namespace palign_cuda

using namespace palign_cuda;

extern "C" {

int pa_cuda_profile(int on) {
  if (!on) {
    const bool ok = !profiling || prof_harvest(); // the spans still in the pool counted
    profiling = false;
    prof_close();
    return ok ? 0 : -1;
  }
  if (!ready) {
    snprintf(last_error, sizeof last_error, "profile: no CUDA device selected");
    return -1;
  }
  if (!prof_pool && !prof_open())
    return -1;
  prof_used = 0, prof_have_last = false; // spans of a profile before: not harvested, not counted
  memset(prof_rows, 0, sizeof prof_rows);
  prof_n_rows = 0, prof_idle_ms = 0.0, prof_open_span = false;
  profiling = true;
  return 0;
}

int pa_cuda_profile_read(const pa_cuda_profile_row **rows, double *idle_ms) {
  if (profiling && !prof_harvest())
    return -1;
  *rows = prof_rows;
  *idle_ms = prof_idle_ms;
  return prof_n_rows;
}

void pa_cuda_profile_write(FILE *f) {
  const pa_cuda_profile_row *rows;
  double idle_ms;
  const int n = pa_cuda_profile_read(&rows, &idle_ms);
  if (n < 0) {
    fprintf(f, "palign: CUDA profile (pid %d): %s\n", (int)getpid(), last_error);
    return;
  }
  pa_cuda_profile_row sorted[kProfRows];
  memcpy(sorted, rows, (size_t)n * sizeof *rows);
  qsort(sorted, (size_t)n, sizeof *sorted, by_time);
  double ms = 0.0;
  unsigned long spans = 0;
  for (int r = 0; r < n; r++)
    ms += sorted[r].ms, spans += sorted[r].spans;
  fprintf(f, "palign: CUDA device time by operation (pid %d, device %d)\n", (int)getpid(), device_used);
  fprintf(f, "  %.1f ms in %lu spans; idle %.1f ms between them (the host's work and waits): busy %.1f%%\n", ms, spans,
          idle_ms, ms + idle_ms > 0.0 ? 100.0 * ms / (ms + idle_ms) : 0.0);
  fprintf(f, "  %-47s %9s %12s %7s %9s %9s\n", "operation (products: N x K)", "spans", "ms", "share", "TFLOP/s",
          "GB/s");
  for (int r = 0; r < n; r++) {
    const pa_cuda_profile_row *w = &sorted[r];
    fprintf(f, "  %-47s %9lu %12.3f %6.1f%%", w->name, w->spans, w->ms, ms > 0.0 ? 100.0 * w->ms / ms : 0.0);
    const double rate = w->flops > 0.0 && w->ms > 0.0 ? w->flops / (w->ms * 1e-3) * 1e-12 : 0.0,
                 gbs = w->bytes > 0.0 && w->ms > 0.0 ? w->bytes / (w->ms * 1e-3) * 1e-9 : 0.0;
    if (rate > 0.0)
      fprintf(f, rate >= 10.0 ? " %9.1f" : " %9.3f", rate);
    else if (gbs > 0.0)
      fprintf(f, " %9s", "");
    if (gbs > 0.0)
      fprintf(f, gbs >= 10.0 ? " %9.1f" : " %9.3f", gbs);
    fputc('\n', f);
  }
}

} // extern "C"
