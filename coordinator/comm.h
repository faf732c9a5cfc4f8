/* comm.h: every MPI call palign makes (the coordinator/worker protocol).
 *
 * Ranks: rank 0 coordinates; ranks 1..size-1 are workers. With one rank the
 * process is both, and nothing here sends anything (the "worker group" is
 * that one process). The rest of palign sees purpose-named calls only.
 *
 * Messages are protobuf (proto/palign.proto) packed into MPI_BYTE buffers:
 * Work from rank 0 to a worker, Report from a worker to rank 0. Collectives
 * among workers (the activation bank) use a communicator without rank 0.
 *
 * Threads: MPI is initialised with MPI_THREAD_FUNNELED; call these from the
 * main thread only (OpenMP regions never call them). Errors: MPI's own errors
 * are returned (MPI_ERRORS_RETURN) as PA_EIO with the call, the place and
 * MPI's message, except in a collective (the broadcasts, all_ok, the workers'
 * calls, the communicators made in pa_comm_init): there the rank that sees
 * the error prints it so and stops the whole job (MPI_Abort, exit 1), since
 * the other ranks are in that collective or the next and would wait for it
 * for ever. Sizes checked before a collective (PA_EINVAL) are returned: every
 * rank checks the same sizes.
 */
#ifndef PALIGN_COMM_H
#define PALIGN_COMM_H

#include "palign.pb-c.h"

#include <stddef.h>

typedef struct pa_comm pa_comm;

/* MPI_Init_thread; the caller's argc/argv. */
int pa_comm_init(int *argc, char ***argv, pa_comm **out);
/* MPI_Finalize and free; accepts NULL. */
void pa_comm_finalize(pa_comm *c);
/* Brings the whole job down (a rank cannot go on and must not hang the others). */
void pa_comm_abort(pa_comm *c, int code);

int pa_comm_rank(const pa_comm *c);
int pa_comm_size(const pa_comm *c);
/* Number of worker ranks: size - 1, or 1 when size is 1. */
int pa_comm_workers(const pa_comm *c);
/* This process's index among the workers (rank - 1, or 0 when size is 1);
 * -1 on the coordinator of a multi-rank job. */
int pa_comm_worker_index(const pa_comm *c);
/* This worker's index among the workers on its node (0, 1, ...: the GPU it
 * takes, modulo the node's devices); -1 on the coordinator. */
int pa_comm_local_worker(const pa_comm *c);
/* How many workers share this worker's node; 0 on the coordinator. */
int pa_comm_local_workers(const pa_comm *c);

/* MPI_Bcast of n bytes from rank 0 to every rank. */
int pa_comm_bcast(pa_comm *c, void *buf, size_t n);
/* A status code from rank 0 to everyone, so that all ranks agree to go on or stop. */
int pa_comm_bcast_status(pa_comm *c, int *status);
/* Whether every rank's ok is true (logical and over the job). */
int pa_comm_all_ok(pa_comm *c, int ok, int *all);

/* Among the workers: each contributes the floats [first, first + n) * per
 * of buf (its slice), and afterwards every worker's buf holds every slice.
 * Slices need not be equal and may be empty. A no-op with one worker. */
int pa_comm_workers_allgather(pa_comm *c, float *buf, size_t per, int first, int n);
int pa_comm_workers_barrier(pa_comm *c);
/* Among the workers: n bytes of worker 0's buf into every worker's. */
int pa_comm_workers_bcast(pa_comm *c, void *buf, size_t n);
/* Among the workers: each one's k ints (mine) into all, in worker order
 * (all holds workers * k). */
int pa_comm_workers_allgather_ints(pa_comm *c, const int *mine, int k, int *all);

/* Rank 0 to worker rank `to`. */
int pa_comm_send_work(pa_comm *c, int to, const Palign__Work *w);
/* A worker, waiting (napping 1 ms between looks): the next Work from rank 0
 * (free with palign__work__free_unpacked). */
int pa_comm_recv_work(pa_comm *c, Palign__Work **out);
/* A worker to rank 0; does not wait for rank 0 to receive it. */
int pa_comm_send_report(pa_comm *c, const Palign__Report *r);
/* Rank 0: the next Report from any worker, waiting at most timeout seconds;
 * *out is NULL on timeout (free with palign__report__free_unpacked). */
int pa_comm_recv_report(pa_comm *c, double timeout, Palign__Report **out);

/* The MPI library's name and version ("Open MPI v4.1.4 ..."), for the manifest. */
const char *pa_comm_library(void);

#endif
