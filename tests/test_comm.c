/* coordinator/comm.c under mpirun: every call the service makes, with the
 * values checked on every rank; and a collective that fails on one rank
 * only, which must stop the whole job with that rank's message instead of
 * leaving the others waiting in the next collective for ever.
 *
 * The binary is both the cmocka driver and the ranks: `test_comm SCENARIO`
 * is one rank of a job that the driver starts with mpirun. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "comm.h"
#include "status.h"
#include "testutil.h"

/* ---- the ranks ---------------------------------------------------------------------- */

/* A check that fails stops the job at once: the other ranks are in, or on
 * their way to, a collective this rank would not join. */
#define CHECK(cond)                                                                                                    \
  do {                                                                                                                 \
    if (!(cond)) {                                                                                                     \
      fprintf(stderr, "rank %d: test_comm.c:%d: %s does not hold\n", rank, __LINE__, #cond);                           \
      pa_comm_abort(c, 1);                                                                                             \
    }                                                                                                                  \
  } while (0)

/* Every call with arguments that agree across the ranks. The bank's
 * all-gather has uneven slices, one of them empty: worker k holds rows
 * [first_k, first_k + n_k) of 3 floats each, with n_k = k % 3. */
static int agree(pa_comm *c) {
  const int rank = pa_comm_rank(c), size = pa_comm_size(c), nw = pa_comm_workers(c), me = pa_comm_worker_index(c);
  CHECK(nw == (size > 1 ? size - 1 : 1) && me == (size > 1 ? rank - 1 : 0));
  char text[64] = {0};
  if (rank == 0)
    snprintf(text, sizeof text, "from rank 0 of %d", size);
  CHECK(pa_comm_bcast(c, text, sizeof text) == PA_OK);
  char want[64];
  snprintf(want, sizeof want, "from rank 0 of %d", size);
  CHECK(!strcmp(text, want));
  int status = rank == 0 ? 7 : 0;
  CHECK(pa_comm_bcast_status(c, &status) == PA_OK && status == 7);
  int all = -1;
  CHECK(pa_comm_all_ok(c, 1, &all) == PA_OK && all == 1);
  CHECK(pa_comm_all_ok(c, rank != size - 1, &all) == PA_OK && all == 0);
  if (me >= 0) {
    int mine[2] = {me, 10 * me}, ints[2 * 64];
    CHECK(nw <= 64 && pa_comm_workers_allgather_ints(c, mine, 2, ints) == PA_OK);
    for (int k = 0; k < nw; k++)
      CHECK(ints[2 * k] == k && ints[2 * k + 1] == 10 * k);
    int first[65] = {0};
    for (int k = 0; k < nw; k++)
      first[k + 1] = first[k] + k % 3;
    float bank[3 * 2 * 64];
    for (int i = 0; i < 3 * first[nw]; i++)
      bank[i] = (i / 3 >= first[me] && i / 3 < first[me + 1]) ? (float)i : -1.0f;
    CHECK(pa_comm_workers_allgather(c, bank, 3, first[me], me % 3) == PA_OK);
    for (int i = 0; i < 3 * first[nw]; i++)
      CHECK(bank[i] == (float)i);
    unsigned char id[16] = {0};
    if (me == 0)
      memcpy(id, "worker 0's id", 14);
    CHECK(pa_comm_workers_bcast(c, id, sizeof id) == PA_OK && !strcmp((char *)id, "worker 0's id"));
    CHECK(pa_comm_workers_barrier(c) == PA_OK);
  }
  fprintf(stderr, "rank %d: all agreed\n", rank);
  return 0;
}

/* One rank makes a call that does not match the others' (a broadcast into
 * a smaller buffer; an all-gather of fewer ints); afterwards every rank goes
 * on to the next collective as the service would, and a rank whose call
 * returned an error leaves as the service's ranks do (MPI_Finalize, exit 1). */
static int disagree(pa_comm *c, const char *which) {
  const int rank = pa_comm_rank(c);
  int err = PA_OK;
  if (!strcmp(which, "bcast")) {
    char buf[64] = "rank 0's message";
    err = pa_comm_bcast(c, buf, rank == 1 ? 4 : sizeof buf);
  } else if (pa_comm_worker_index(c) >= 0) {
    int mine[2] = {rank, rank}, all[2 * 64];
    err = pa_comm_workers_allgather_ints(c, mine, pa_comm_worker_index(c) == 1 ? 1 : 2, all);
  }
  if (err) {
    fprintf(stderr, "rank %d: returned: %s\n", rank, pa_errmsg());
    return 1;
  }
  int all = 0;
  err = pa_comm_all_ok(c, 1, &all);
  fprintf(stderr, "rank %d: went on (%d)\n", rank, err);
  return 0;
}

static int be_a_rank(int argc, char **argv) {
  pa_comm *c = NULL;
  if (pa_comm_init(&argc, &argv, &c)) {
    fprintf(stderr, "%s\n", pa_errmsg());
    return 1;
  }
  const int rc = !strcmp(argv[1], "agree") ? agree(c) : disagree(c, argv[1]);
  pa_comm_finalize(c);
  return rc;
}

/* ---- the driver ---------------------------------------------------------------------- */

static char self[PATH_MAX];

/* mpirun -np np test_comm scenario, at most 60 s; its exit status and what it printed. */
static int job(int np, const char *scenario, char *out, size_t n) {
  const int rc = tu_run(out, n, NULL, 0, "timeout 60 '%s' -np %d '%s' %s", PALIGN_MPIEXEC, np, self, scenario);
  if (rc == 124)
    fail_msg("mpirun -np %d test_comm %s still ran after 60 s (a rank waiting for ever):\n%s", np, scenario, out);
  return rc;
}

static void test_agree(void **state) {
  (void)state;
  static char out[1 << 16];
  for (int np = 1; np <= 5; np += 2) {
    if (job(np, "agree", out, sizeof out) != 0)
      fail_msg("mpirun -np %d test_comm agree:\n%s", np, out);
    for (int r = 0; r < np; r++) {
      char line[64];
      snprintf(line, sizeof line, "rank %d: all agreed", r);
      tu_expect_in(out, line, "the job's output");
    }
  }
}

/* The rank that sees MPI's error names the call and stops the job: no rank
 * returns from it or goes on to wait in the next collective. */
static void test_one_rank_fails(void **state) {
  (void)state;
  static char out[1 << 16];
  const struct {
    const char *scenario, *says;
    int np;
  } cases[] = {
      {"bcast", "rank 1: MPI: MPI_Bcast(buf, (int)n, MPI_BYTE, 0, MPI_COMM_WORLD) failed at comm.c:", 2},
      {"allgather", "rank 2: MPI: MPI_Allgather(mine, k, MPI_INT, all, k, MPI_INT, c->workers) failed at comm.c:", 3},
  };
  for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
    assert_int_not_equal(job(cases[i].np, cases[i].scenario, out, sizeof out), 0);
    tu_expect_in(out, cases[i].says, "the job's output");
    tu_expect_in(out, "MPI_ERR_TRUNCATE", "the job's output");
    tu_expect_in(out, "stopping the job", "the job's output");
    if (strstr(out, "returned:") || strstr(out, "went on"))
      fail_msg("a rank returned from the failed collective or went on:\n%s", out);
  }
}

int main(int argc, char **argv) {
  if (argc > 1)
    return be_a_rank(argc, argv);
  const ssize_t len = readlink("/proc/self/exe", self, sizeof self - 1);
  if (len <= 0) {
    perror("test_comm: /proc/self/exe");
    return 1;
  }
  self[len] = '\0';
  setenv("OMPI_ALLOW_RUN_AS_ROOT", "1", 1);
  setenv("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1", 1);
  setenv("OMPI_MCA_rmaps_base_oversubscribe", "1", 1);
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_agree),
      cmocka_unit_test(test_one_rank_fails),
  };
  return cmocka_run_group_tests(tests, tu_setup, tu_teardown);
}
