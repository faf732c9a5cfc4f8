#include "comm.h"

#include "status.h"

#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

enum { TAG_WORK = 1, TAG_REPORT = 2 };

struct pa_comm {
  int rank, size;
  MPI_Comm workers;  /* ranks 1..size-1 (or the one rank); MPI_COMM_NULL on rank 0 of a multi-rank job */
  int local_worker;  /* index among the workers on this node; -1 on a coordinator */
  int local_workers; /* workers on this node; 0 on a coordinator */
};

/* Every MPI call goes through this: the call, the place and MPI's message. */
static int mpi_error(int err, const char *call, int line) {
  char msg[MPI_MAX_ERROR_STRING];
  int len = 0;
  MPI_Error_string(err, msg, &len);
  return pa_error(PA_EIO, "MPI: %s failed at comm.c:%d: %s", call, line, msg);
}
#define MPI_CHECK(call)                                                                                                \
  do {                                                                                                                 \
    int err_ = (call);                                                                                                 \
    if (err_ != MPI_SUCCESS)                                                                                           \
      return mpi_error(err_, #call, __LINE__);                                                                         \
  } while (0)

/* A collective that fails on this rank cannot be answered by returning: the
 * other ranks are in it, or go on to the next one, and would wait there for
 * ever (MPI leaves its state undefined after an error anyway). So the rank
 * says what failed and brings the whole job down. */
static _Noreturn void collective_failed(int err, const char *call, int line) {
  int rank = -1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  mpi_error(err, call, line);
  fprintf(stderr, "palign-worker: rank %d: %s; stopping the job (the other ranks would wait for it)\n", rank,
          pa_errmsg());
  fflush(stderr);
  MPI_Abort(MPI_COMM_WORLD, 1);
  _Exit(1); /* MPI_Abort does not return */
}
#define COLLECTIVE(call)                                                                                               \
  do {                                                                                                                 \
    int err_ = (call);                                                                                                 \
    if (err_ != MPI_SUCCESS)                                                                                           \
      collective_failed(err_, #call, __LINE__);                                                                        \
  } while (0)

int pa_comm_init(int *argc, char ***argv, pa_comm **out) {
  *out = NULL;
  int provided = 0;
  MPI_CHECK(MPI_Init_thread(argc, argv, MPI_THREAD_FUNNELED, &provided));
  MPI_CHECK(MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN));
  pa_comm *c = calloc(1, sizeof *c);
  if (!c)
    return pa_error(PA_ENOMEM, "no memory");
  MPI_CHECK(MPI_Comm_rank(MPI_COMM_WORLD, &c->rank));
  MPI_CHECK(MPI_Comm_size(MPI_COMM_WORLD, &c->size));
  const int is_worker = c->size == 1 || c->rank > 0;
  COLLECTIVE(MPI_Comm_split(MPI_COMM_WORLD, is_worker ? 1 : MPI_UNDEFINED, c->rank, &c->workers));
  if (c->workers != MPI_COMM_NULL)
    MPI_CHECK(MPI_Comm_set_errhandler(c->workers, MPI_ERRORS_RETURN));
  /* this worker's place among the workers on its node: which GPU it takes */
  c->local_worker = -1;
  if (c->workers != MPI_COMM_NULL) {
    MPI_Comm node;
    COLLECTIVE(MPI_Comm_split_type(c->workers, MPI_COMM_TYPE_SHARED, c->rank, MPI_INFO_NULL, &node));
    MPI_CHECK(MPI_Comm_rank(node, &c->local_worker));
    MPI_CHECK(MPI_Comm_size(node, &c->local_workers));
    MPI_Comm_free(&node);
  }
  *out = c;
  return PA_OK;
}

void pa_comm_finalize(pa_comm *c) {
  if (!c)
    return;
  if (c->workers != MPI_COMM_NULL)
    MPI_Comm_free(&c->workers);
  free(c);
  MPI_Finalize();
}

void pa_comm_abort(pa_comm *c, int code) {
  (void)c;
  MPI_Abort(MPI_COMM_WORLD, code);
}

int pa_comm_rank(const pa_comm *c) { return c->rank; }
int pa_comm_size(const pa_comm *c) { return c->size; }
int pa_comm_workers(const pa_comm *c) { return c->size > 1 ? c->size - 1 : 1; }
int pa_comm_worker_index(const pa_comm *c) { return c->size == 1 ? 0 : c->rank - 1; }
int pa_comm_local_worker(const pa_comm *c) { return c->local_worker; }
int pa_comm_local_workers(const pa_comm *c) { return c->local_workers; }

int pa_comm_bcast(pa_comm *c, void *buf, size_t n) {
  (void)c;
  if (n > (size_t)INT32_MAX)
    return pa_error(PA_EINVAL, "MPI: a broadcast of %zu bytes", n);
  COLLECTIVE(MPI_Bcast(buf, (int)n, MPI_BYTE, 0, MPI_COMM_WORLD));
  return PA_OK;
}

int pa_comm_bcast_status(pa_comm *c, int *status) {
  (void)c;
  COLLECTIVE(MPI_Bcast(status, 1, MPI_INT, 0, MPI_COMM_WORLD));
  return PA_OK;
}

int pa_comm_all_ok(pa_comm *c, int ok, int *all) {
  (void)c;
  int mine = ok != 0;
  COLLECTIVE(MPI_Allreduce(&mine, all, 1, MPI_INT, MPI_LAND, MPI_COMM_WORLD));
  return PA_OK;
}

int pa_comm_workers_allgather(pa_comm *c, float *buf, size_t per, int first, int n) {
  if (c->workers == MPI_COMM_NULL)
    return pa_error(PA_EINVAL, "MPI: the coordinator is not in the worker group");
  int nw = 0;
  MPI_CHECK(MPI_Comm_size(c->workers, &nw));
  if (nw == 1)
    return PA_OK;
  int mine[2] = {first, n}, *all = malloc((size_t)nw * 2 * sizeof *all);
  int *counts = malloc((size_t)nw * sizeof *counts), *displs = malloc((size_t)nw * sizeof *displs);
  if (!all || !counts || !displs) {
    /* the other workers are already in the collective: returning would leave them waiting for ever */
    fprintf(stderr, "palign-worker: MPI: no memory for the activation bank's exchange; stopping the job\n");
    MPI_Abort(MPI_COMM_WORLD, 1);
  }
  COLLECTIVE(MPI_Allgather(mine, 2, MPI_INT, all, 2, MPI_INT, c->workers));
  int rc = PA_OK;
  for (int k = 0; !rc && k < nw; k++) {
    const size_t cnt = (size_t)all[2 * k + 1] * per, off = (size_t)all[2 * k] * per;
    if (cnt > (size_t)INT32_MAX || off > (size_t)INT32_MAX)
      rc = pa_error(PA_EINVAL, "MPI: a slice of %zu floats at %zu is too large for one message", cnt, off);
    counts[k] = (int)cnt, displs[k] = (int)off;
  }
  if (!rc)
    COLLECTIVE(MPI_Allgatherv(MPI_IN_PLACE, 0, MPI_DATATYPE_NULL, buf, counts, displs, MPI_FLOAT, c->workers));
  free(all), free(counts), free(displs);
  return rc;
}

int pa_comm_workers_bcast(pa_comm *c, void *buf, size_t n) {
  if (c->workers == MPI_COMM_NULL)
    return pa_error(PA_EINVAL, "MPI: the coordinator is not in the worker group");
  if (n > (size_t)INT32_MAX)
    return pa_error(PA_EINVAL, "MPI: a broadcast of %zu bytes", n);
  COLLECTIVE(MPI_Bcast(buf, (int)n, MPI_BYTE, 0, c->workers));
  return PA_OK;
}

int pa_comm_workers_allgather_ints(pa_comm *c, const int *mine, int k, int *all) {
  if (c->workers == MPI_COMM_NULL)
    return pa_error(PA_EINVAL, "MPI: the coordinator is not in the worker group");
  COLLECTIVE(MPI_Allgather(mine, k, MPI_INT, all, k, MPI_INT, c->workers));
  return PA_OK;
}

int pa_comm_workers_barrier(pa_comm *c) {
  if (c->workers != MPI_COMM_NULL)
    COLLECTIVE(MPI_Barrier(c->workers));
  return PA_OK;
}

/* A packed protobuf message to rank `to` with `tag`. */
static int send_packed(size_t n, uint8_t *buf, int to, int tag) {
  int err = MPI_Send(buf, (int)n, MPI_BYTE, to, tag, MPI_COMM_WORLD);
  free(buf);
  return err == MPI_SUCCESS ? PA_OK : mpi_error(err, "MPI_Send", __LINE__);
}

/* Receives the message `st` announces into a fresh buffer. */
static int recv_probed(MPI_Status *st, uint8_t **buf, int *n) {
  MPI_CHECK(MPI_Get_count(st, MPI_BYTE, n));
  *buf = malloc((size_t)*n + 1);
  if (!*buf)
    return pa_error(PA_ENOMEM, "no memory");
  int err = MPI_Recv(*buf, *n, MPI_BYTE, st->MPI_SOURCE, st->MPI_TAG, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
  if (err != MPI_SUCCESS) {
    free(*buf);
    return mpi_error(err, "MPI_Recv", __LINE__);
  }
  return PA_OK;
}

static double now_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* Waits up to timeout seconds (forever if negative) for a message from
 * source with tag, napping nap_ms between looks: Open MPI's blocking probe
 * spins, and a waiting rank would hold a core the others need (the
 * coordinator also wants to notice signals and silent workers while it
 * waits). *found says whether one came. */
static int probe_napping(int source, int tag, double timeout, long nap_ms, MPI_Status *st, int *found) {
  const double t_end = now_s() + timeout;
  for (*found = 0;;) {
    MPI_CHECK(MPI_Iprobe(source, tag, MPI_COMM_WORLD, found, st));
    if (*found || (timeout >= 0 && now_s() >= t_end))
      return PA_OK;
    nanosleep(&(struct timespec){.tv_nsec = nap_ms * 1000000}, NULL);
  }
}

/* The message `st` announces, unpacked by unpack; PA_EFORMAT if it does not. */
static int recv_unpacked(MPI_Status *st, void *(*unpack)(size_t, const uint8_t *), void **out, const char *what) {
  uint8_t *buf = NULL;
  int n = 0;
  int rc = recv_probed(st, &buf, &n);
  if (rc)
    return rc;
  *out = unpack((size_t)n, buf);
  free(buf);
  return *out ? PA_OK : pa_error(PA_EFORMAT, "MPI: a %s message from rank %d does not unpack", what, st->MPI_SOURCE);
}

static void *unpack_work(size_t n, const uint8_t *b) { return palign__work__unpack(NULL, n, b); }
static void *unpack_report(size_t n, const uint8_t *b) { return palign__report__unpack(NULL, n, b); }

int pa_comm_send_work(pa_comm *c, int to, const Palign__Work *w) {
  (void)c;
  size_t n = palign__work__get_packed_size(w);
  uint8_t *buf = malloc(n + 1);
  if (!buf)
    return pa_error(PA_ENOMEM, "no memory");
  palign__work__pack(w, buf);
  return send_packed(n, buf, to, TAG_WORK);
}

int pa_comm_recv_work(pa_comm *c, Palign__Work **out) {
  (void)c;
  *out = NULL;
  MPI_Status st;
  int found, rc = probe_napping(0, TAG_WORK, -1, 1, &st, &found);
  return rc ? rc : recv_unpacked(&st, unpack_work, (void **)out, "Work");
}

int pa_comm_send_report(pa_comm *c, const Palign__Report *r) {
  (void)c;
  size_t n = palign__report__get_packed_size(r);
  uint8_t *buf = malloc(n + 1);
  if (!buf)
    return pa_error(PA_ENOMEM, "no memory");
  palign__report__pack(r, buf);
  return send_packed(n, buf, 0, TAG_REPORT);
}

int pa_comm_recv_report(pa_comm *c, double timeout, Palign__Report **out) {
  (void)c;
  *out = NULL;
  MPI_Status st;
  int found, rc = probe_napping(MPI_ANY_SOURCE, TAG_REPORT, timeout, 2, &st, &found);
  return rc || !found ? rc : recv_unpacked(&st, unpack_report, (void **)out, "Report");
}

const char *pa_comm_library(void) {
  static char version[MPI_MAX_LIBRARY_VERSION_STRING];
  int len = 0;
  if (!version[0] && MPI_Get_library_version(version, &len) == MPI_SUCCESS) {
    for (int i = 0; i < len; i++)
      if (version[i] == '\n' || version[i] == ',') {
        version[i] = '\0';
        break;
      }
  }
  return version;
}
