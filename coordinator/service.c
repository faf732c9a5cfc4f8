#include "service.h"

#include "backend.h"
#include "bank.h"
#include "build_info.h"
#include "chat.h"
#include "forward.h"
#include "inventory.h"
#include "methods.h"
#include "model.h"
#include "pas.h"
#include "record.h"
#include "rng.h"
#include "status.h"
#include "store.h"

#include <inttypes.h>
#include <math.h>
#include <signal.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define MAX_METHODS 16

volatile sig_atomic_t pa_service_stop_signal = 0;

static void on_signal(int sig) { pa_service_stop_signal = sig; }

static double now_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

typedef struct progress progress;
typedef struct worker_state worker_state;

typedef struct service {
  const pa_service_opts *o;
  pa_comm *comm;
  FILE *log;
  int rank, size;
  pa_inventory *inv;
  pa_subjects *subjects;
  size_t first, last;
  const pa_method *methods[MAX_METHODS];
  int n_methods;
  bool need_model, need_bank, need_dpo;
  char model_fp[65];
  int run;        /* this run's number (1, 2, ...): names the shards */
  long hand_outs; /* rank 0: Work messages sent */

  /* a worker's */
  pa_model *model;
  pa_lm *lm;
  const pa_backend *be; /* the lm's */
  const char *be_name;  /* its name ("cpu", "cuda") */
  pa_group *group;      /* the workers' GPUs, when they exchange the bank by NCCL (join_group) */
  pa_evaluator *ev;
  pa_bank *bank;
  pa_pas_bank bank_view;
  pa_pas_result pas;
  pa_dpo_result dpo;
  pa_dpo_opts dpo_opts; /* o->dpo with the run seed */
  Palign__DpoSettings dpo_settings;
  pa_method_ctx ctx;
  pa_method_out mo;
  pa_shard_writer *shard;
  const int *test;
  int n_test;
  double last_beat, last_line;
  char current[64];
  progress *alone; /* one rank: the progress the poll prints during long subjects */
  char said[1024]; /* the last error printed (say_error) */
  char run_error[1024]; /* rank 0: the first error that stopped the run, for its record */
} service;

static void print_progress(service *sv, progress *p, const worker_state *ws, int n_workers, bool force);

/* This rank's error, once, where it happened: "palign-worker: MESSAGE" on
 * rank 0 (and in a one-rank job), "palign-worker: rank K: MESSAGE" on a
 * worker. */
static void say_error(service *sv) {
  const char *m = pa_errmsg();
  if (!strcmp(m, sv->said))
    return;
  snprintf(sv->said, sizeof sv->said, "%s", m);
  if (sv->rank == 0)
    fprintf(sv->log, "palign-worker: %s\n", m);
  else
    fprintf(sv->log, "palign-worker: rank %d: %s\n", sv->rank, m);
}

/* ---- both sides ----------------------------------------------------------------- */

static int load_data(service *sv) {
  const pa_service_opts *o = sv->o;
  int rc = pa_papi_load(o->papi, o->subjects_file, &sv->inv, &sv->subjects);
  if (!rc &&
      pa_subjects_range(o->subjects ? o->subjects : "all", pa_subjects_count(sv->subjects), &sv->first, &sv->last))
    rc = pa_error(PA_EINVAL, "--subjects '%s' is not all, N or A-B within the %zu subjects", o->subjects,
                  pa_subjects_count(sv->subjects));
  if (!rc) {
    sv->n_methods = pa_methods_parse(o->methods, sv->methods, MAX_METHODS);
    rc = sv->n_methods < 0 ? sv->n_methods : PA_OK;
  }
  for (int j = 0; !rc && j < sv->n_methods; j++) {
    sv->need_model |= sv->methods[j]->needs_model;
    sv->need_bank |= sv->methods[j]->needs_bank;
    sv->need_dpo |= sv->methods[j]->needs_dpo;
  }
  sv->dpo_opts = o->dpo;
  sv->dpo_opts.run_seed = o->seed;
  if (!rc && sv->need_dpo)
    rc = pa_dpo_validate(&sv->dpo_opts);
  if (!rc && sv->need_dpo)
    pa_dpo_settings_to_proto(&sv->dpo_opts, &sv->dpo_settings);
  if (!rc && o->benchmark_delay > 0 && sv->need_model)
    rc = pa_error(PA_EINVAL, "the benchmark mode runs no model: only the model-free methods (const3, trait_mean) "
                             "go with --benchmark-delay");
  if (!rc && sv->need_dpo && o->eval.mode != PA_READ_LOGITS)
    rc = pa_error(PA_EINVAL, "the DPO methods train on the option letters' logits: use --mode logits");
  if (!rc && sv->need_bank)
    rc = pa_pas_holdout_check(sv->inv, o->holdout_per_trait);
  if (!rc)
    sv->test = pa_inventory_test(sv->inv, &sv->n_test);
  return rc;
}

/* The settings a store is made with (strings borrowed from sv and bufs). */
static int settings_of(const service *sv, Palign__Settings *st, char inv_fp[65], char **names) {
  palign__settings__init(st);
  st->model_fingerprint = (char *)sv->model_fp;
  const int rc = pa_bank_inventory_fingerprint(sv->inv, inv_fp);
  if (rc)
    return rc;
  st->inventory_fingerprint = inv_fp;
  for (int j = 0; j < sv->n_methods; j++)
    names[j] = (char *)sv->methods[j]->name;
  st->n_methods = (size_t)sv->n_methods;
  st->methods = names;
  st->mode = sv->o->eval.mode == PA_READ_GENERATE ? "generate" : "logits";
  st->run_seed = sv->o->seed;
  st->lowercase_items = !sv->o->eval.keep_case;
  st->holdout_per_trait = sv->o->holdout_per_trait ? sv->o->holdout_per_trait : PA_PAS_HOLDOUT_PER_TRAIT;
  st->n_alphas = sv->o->alphas ? (size_t)sv->o->n_alphas : sizeof pa_pas_default_alphas / sizeof *pa_pas_default_alphas;
  st->alphas = (double *)(sv->o->alphas ? sv->o->alphas : pa_pas_default_alphas);
  st->top_k = PA_PAS_TOP_K;
  st->subjects_file = (char *)(sv->o->subjects_file ? sv->o->subjects_file : "Test-set.json");
  if (sv->need_dpo)
    st->dpo = (Palign__DpoSettings *)&sv->dpo_settings; /* borrowed, as the strings are */
  st->benchmark_delay = sv->o->benchmark_delay;
  st->benchmark_cv = sv->o->benchmark_delay > 0 ? sv->o->benchmark_cv : 0;
  /* auto: known once the workers have their model (same_weights) */
  st->weights = (char *)(sv->o->weights && strcmp(sv->o->weights, "auto") ? sv->o->weights : "");
  return PA_OK;
}

/* ---- every rank runs what rank 0 runs ------------------------------------------ */

static uint64_t fnv(uint64_t h, const void *p, size_t n) {
  for (size_t i = 0; i < n; i++)
    h = (h ^ ((const uint8_t *)p)[i]) * 1099511628211ull;
  return h;
}

static uint64_t fnv_str(uint64_t h, const char *s) { return fnv(h, s ? s : "", s ? strlen(s) + 1 : 1); }

/* FNV-1a over all a worker reads of the data: the items (number, trait,
 * key, text), the split, and the subjects in file order (id, answers,
 * whether usable, description), so that the same position names the same
 * person with the same answers on every rank. */
static uint64_t data_digest(const pa_inventory *inv, const pa_subjects *ss) {
  uint64_t h = 14695981039346656037ull;
  for (int k = 1, n = pa_inventory_n_items(inv); k <= n; k++) {
    const pa_item *it = pa_inventory_item(inv, k);
    const int32_t head[3] = {it ? it->number : 0, it ? (int32_t)it->trait : -1, it ? it->keyed : 0};
    h = fnv_str(fnv(h, head, sizeof head), it ? it->text : NULL);
  }
  int n_split;
  const int *split = pa_inventory_train(inv, &n_split);
  h = fnv(fnv(h, &n_split, sizeof n_split), split, (size_t)n_split * sizeof *split);
  split = pa_inventory_test(inv, &n_split);
  h = fnv(fnv(h, &n_split, sizeof n_split), split, (size_t)n_split * sizeof *split);
  for (size_t i = 0, n = pa_subjects_count(ss); i < n; i++) {
    const pa_subject *s = pa_subjects_at(ss, i);
    h = fnv(fnv_str(h, s->id), s->answers, sizeof s->answers);
    h = fnv_str(fnv(h, &s->usable, sizeof s->usable), s->description);
  }
  return h;
}

/* Rank 0 sends its settings (the store's, packed) and its data's digest;
 * each worker that loaded its own data compares them with its own, its own
 * model's fingerprint (own_fp) in place of rank 0's. A job
 * whose ranks were started otherwise (an MPMD command line, a node whose
 * cache holds another model file or another PAPI copy) would store rank
 * 0's labels over other work, or its ranks would meet in different
 * collectives and wait for ever. The weight format is left to
 * same_weights, once the workers have their model. rc: this rank's state
 * so far; every rank calls this. */
static int agree_with_rank0(service *sv, int rc, const char *own_fp) {
  uint8_t packed[8192];
  uint64_t head[2] = {0, 0}; /* the data's digest and the settings' length; 0: rank 0 failed */
  Palign__Settings st;
  char inv_fp[65];
  char *names[MAX_METHODS];
  if (sv->rank == 0 && !rc)
    rc = settings_of(sv, &st, inv_fp, names);
  if (sv->rank == 0 && !rc) {
    st.weights = (char *)"";
    const size_t n = palign__settings__get_packed_size(&st);
    if (n > sizeof packed)
      rc = pa_error(PA_EINVAL, "the run's settings take %zu bytes packed (at most %zu)", n, sizeof packed);
    else
      head[0] = data_digest(sv->inv, sv->subjects), head[1] = palign__settings__pack(&st, packed);
  }
  int err = pa_comm_bcast(sv->comm, head, sizeof head);
  if (!err && head[1])
    err = pa_comm_bcast(sv->comm, packed, (size_t)head[1]);
  if (err)
    return err;
  if (sv->rank == 0 || rc || !head[1])
    return rc;
  Palign__Settings *theirs = palign__settings__unpack(NULL, (size_t)head[1], packed);
  if (!theirs)
    return pa_error(PA_EINVAL, "rank 0's settings did not unpack");
  if (!(rc = settings_of(sv, &st, inv_fp, names))) {
    st.model_fingerprint = (char *)own_fp;
    st.weights = (char *)"";
    rc = pa_settings_compare("started otherwise than rank 0:", "on rank 0", &st, theirs);
  }
  palign__settings__free_unpacked(theirs, NULL);
  if (!rc && data_digest(sv->inv, sv->subjects) != head[0])
    rc = pa_error(PA_EINVAL,
                  "reads other data than rank 0 (the subjects in %s, their answers or descriptions, or the items: "
                  "another copy of PAPI)",
                  st.subjects_file);
  return rc;
}

/* ---- the coordinator's store work -------------------------------------------- */

typedef struct {
  char **ids;
  size_t n, cap;
  const char *model_fp; /* this run's; a record made otherwise is counted */
  uint64_t seed;
  size_t foreign;
  char first_foreign[256];
} id_list;

static int collect_id(void *ctx, const pa_record_info *info, const Palign__SubjectResult *r) {
  id_list *l = ctx;
  if (info->status != PA_RECORD_OK)
    return 0;
  if (strcmp(r->model_fingerprint, l->model_fp) || r->run_seed != l->seed) {
    if (!l->foreign++)
      snprintf(l->first_foreign, sizeof l->first_foreign, "subject %s in shards/%s, model %.16s%s, seed %" PRIu64,
               r->subject_id, info->shard, r->model_fingerprint, strlen(r->model_fingerprint) > 16 ? ".." : "",
               r->run_seed);
    return 0;
  }
  if (l->n == l->cap) {
    size_t cap = l->cap ? 2 * l->cap : 256;
    char **ids = realloc(l->ids, cap * sizeof *ids);
    if (!ids)
      return pa_error(PA_ENOMEM, "no memory");
    l->ids = ids, l->cap = cap;
  }
  if (!(l->ids[l->n] = strdup(r->subject_id)))
    return pa_error(PA_ENOMEM, "no memory");
  l->n++;
  return 0;
}

static int cmp_str(const void *a, const void *b) { return strcmp(*(char *const *)a, *(char *const *)b); }

/* The positions in [first, last] of subjects without a valid record.
 * Refuses a store whose records this run cannot vouch for: records made
 * with another model or seed (shards copied in by hand), or records in a
 * store whose manifest, with the settings they were made with, is gone
 * (settled: the manifest's settings were read and match this run's). */
static int subjects_to_do(service *sv, bool settled, size_t **todo, size_t *n_todo, size_t *n_stored) {
  id_list done = {.model_fp = sv->model_fp, .seed = sv->o->seed};
  size_t counts[6] = {0};
  const char *store = sv->o->store;
  int rc = pa_store_read(store, collect_id, &done, counts);
  if (rc == PA_ENOTFOUND)
    rc = PA_OK;
  size_t damaged = 0;
  for (int k = 1; k < 6; k++)
    damaged += counts[k];
  if (!rc && done.foreign)
    rc = pa_error(PA_EINVAL,
                  "%s: %zu record%s made with another model or seed than this run's (the first: %s); palign adds "
                  "nothing to a store that mixes them (palign query %s verify names them all)",
                  store, done.foreign, done.foreign == 1 ? " was" : "s were", done.first_foreign, store);
  if (!rc && !settled && done.n + damaged > 0)
    rc = pa_error(PA_EINVAL,
                  "%s: the shards hold %zu records but %s/manifest.pb, with the settings they were made with, is "
                  "missing or has none; palign adds nothing to a store it cannot check (restore the manifest, or "
                  "move the shards away)",
                  store, done.n + damaged, store);
  if (!rc && damaged)
    fprintf(sv->log,
            "palign-worker: %s: %zu damaged records skipped (palign query %s verify names them); their "
            "subjects are done again\n",
            sv->o->store, damaged, sv->o->store);
  if (done.n > 1)
    qsort(done.ids, done.n, sizeof *done.ids, cmp_str);
  *todo = malloc((sv->last - sv->first + 1) * sizeof **todo);
  if (!rc && !*todo)
    rc = pa_error(PA_ENOMEM, "no memory");
  *n_todo = 0, *n_stored = 0;
  for (size_t i = sv->first; !rc && i <= sv->last; i++) {
    const char *id = pa_subjects_at(sv->subjects, i)->id;
    if (done.n && bsearch(&id, done.ids, done.n, sizeof *done.ids, cmp_str))
      (*n_stored)++;
    else
      (*todo)[(*n_todo)++] = i;
  }
  for (size_t i = 0; i < done.n; i++)
    free(done.ids[i]);
  free(done.ids);
  return rc;
}

/* The manifest of this run: the old one's runs and shards, then ours.
 * Strings are borrowed from `old`, sv and the buffers here. */
typedef struct {
  Palign__Manifest *old; /* as read, or NULL for a new store */
  Palign__Manifest m;
  Palign__Settings settings;
  Palign__RunRecord run;
  Palign__RunRecord **runs;
  char **shards;
  char (*shard_names)[64];
  char inv_fp[65], host[256];
  char *method_names[MAX_METHODS];
} run_manifest;

static void run_manifest_free(run_manifest *rm) {
  if (rm->old)
    palign__manifest__free_unpacked(rm->old, NULL);
  free(rm->runs), free(rm->shards), free(rm->shard_names);
  memset(rm, 0, sizeof *rm);
}

/* Checks the store's settings and numbers this run; prepares the manifest
 * with this run and its shards (rm->m), which pa_service_run writes once
 * every worker has created its shard, so that a run that cannot start
 * leaves the store as it was. */
static int plan_run(service *sv, run_manifest *rm) {
  const pa_service_opts *o = sv->o;
  memset(rm, 0, sizeof *rm);
  int rc = settings_of(sv, &rm->settings, rm->inv_fp, rm->method_names);
  if (rc)
    return rc;
  rc = pa_manifest_read(o->store, &rm->old);
  if (rc == PA_ENOTFOUND) {
    pa_error_clear();
    rc = PA_OK;
  }
  if (!rc && rm->old && rm->old->settings)
    rc = pa_settings_check(o->store, rm->old->settings, &rm->settings);
  if (!rc)
    rc = pa_store_next_run(o->store, rm->old, &sv->run);
  if (rc)
    return rc;
  const size_t n_old_runs = rm->old ? rm->old->n_runs : 0, n_old_shards = rm->old ? rm->old->n_shards : 0;
  const int workers = pa_comm_workers(sv->comm);
  rm->runs = calloc(n_old_runs + 1, sizeof *rm->runs);
  rm->shards = calloc(n_old_shards + (size_t)workers, sizeof *rm->shards);
  rm->shard_names = calloc((size_t)workers, sizeof *rm->shard_names);
  if (!rm->runs || !rm->shards || !rm->shard_names)
    return pa_error(PA_ENOMEM, "no memory");
  Palign__Manifest *m = &rm->m;
  palign__manifest__init(m);
  m->format = PA_STORE_FORMAT;
  m->settings = &rm->settings;
  for (size_t i = 0; i < n_old_runs; i++)
    rm->runs[i] = rm->old->runs[i];
  for (size_t i = 0; i < n_old_shards; i++)
    rm->shards[i] = rm->old->shards[i];

  Palign__RunRecord *run = &rm->run;
  palign__run_record__init(run);
  gethostname(rm->host, sizeof rm->host - 1);
  run->started_unix = (int64_t)time(NULL);
  run->ranks = sv->size;
  run->git_revision = (char *)pa_git_revision; /* protobuf-c's strings are not const; packing only reads */
  run->version = (char *)pa_version;
  run->build = (char *)pa_build;
  run->host = rm->host;
  run->model_path = (char *)o->model;
  run->papi_dir = (char *)pa_papi_dir(o->papi);
  rm->runs[n_old_runs] = run;
  m->n_runs = n_old_runs + 1, m->runs = rm->runs;

  m->n_shards = n_old_shards;
  for (int w = 0; w < workers; w++) {
    pa_shard_name(sv->run, sv->size == 1 ? 0 : w + 1, rm->shard_names[w]);
    rm->shards[m->n_shards++] = rm->shard_names[w]; /* a new name: pa_store_next_run */
  }
  m->shards = rm->shards;
  m->subjects_total = (int64_t)pa_subjects_count(sv->subjects);
  return PA_OK;
}

/* Every worker's new shard must be in rank 0's store before the manifest
 * lists it: a worker whose --store is another directory (the default,
 * relative results/store, from another working directory on its node)
 * would otherwise write where no manifest or lock reaches. */
static int shards_in_store(const service *sv, const run_manifest *rm) {
  for (int w = 0; w < pa_comm_workers(sv->comm); w++) {
    char path[4096];
    struct stat st;
    snprintf(path, sizeof path, "%s/shards/%s", sv->o->store, rm->shard_names[w]);
    if (stat(path, &st) != 0)
      return pa_error(PA_EINVAL,
                      "rank %d made its shard %s elsewhere than %s/shards: its --store is another directory (a "
                      "relative path from another working directory?); give every rank the same store",
                      sv->size == 1 ? 0 : w + 1, rm->shard_names[w], sv->o->store);
  }
  return PA_OK;
}

static int end_run(service *sv, run_manifest *rm, long done, long failed, bool interrupted, const char *error) {
  rm->run.finished_unix = (int64_t)time(NULL);
  rm->run.subjects_done = done;
  rm->run.subjects_failed = failed;
  rm->run.interrupted = interrupted;
  rm->run.error = (char *)(error ? error : "");
  return pa_manifest_write(sv->o->store, &rm->m);
}

/* ---- a worker ------------------------------------------------------------------- */

/* A report to rank 0. One that cannot be sent stops the job: rank 0 would
 * wait for this worker's subjects for ever. */
static void tell_rank0(service *sv, const Palign__Report *r) {
  if (pa_comm_send_report(sv->comm, r)) {
    say_error(sv);
    fprintf(sv->log, "palign-worker: rank %d cannot report to rank 0; stopping the job\n", sv->rank);
    pa_comm_abort(sv->comm, 1);
  }
}

/* The evaluator's poll: stops on a signal, and keeps the coordinator told
 * that this worker is alive during long subjects. */
static int worker_poll(void *ctx) {
  service *sv = ctx;
  if (pa_service_stop_signal)
    return 1;
  const double beat = sv->o->heartbeat_every > 0 ? sv->o->heartbeat_every : 5;
  if (sv->size > 1 && now_s() - sv->last_beat >= beat) {
    Palign__Report r = PALIGN__REPORT__INIT;
    r.rank = sv->rank;
    r.current = sv->current;
    tell_rank0(sv, &r);
    sv->last_beat = now_s();
  }
  if (sv->alone)
    print_progress(sv, sv->alone, NULL, 0, false);
  return 0;
}

/* The bank's progress: heartbeats, a line every 10 s; a signal stops it. */
static int bank_progress(void *ctx, int done, int total) {
  service *sv = ctx;
  const int stop = worker_poll(sv);
  if (pa_comm_worker_index(sv->comm) == 0 && (done == total || now_s() - sv->last_line >= 10)) {
    fprintf(sv->log, "activation bank: %d/%d sequences of this worker's slice\n", done, total);
    sv->last_line = now_s();
  }
  return stop;
}

/* Every rank together: whether all got rc == PA_OK. When another did not,
 * an error saying so (a signal, if one came: the run is interrupted, not
 * failed). A collective of comm.h that fails in MPI stops the job there;
 * what the service's collectives still return is a size refused before the
 * call, the same on every rank, so every rank leaves by the same path. */
static int all_ok(service *sv, int rc, const char *what) {
  int ok = 0, err = pa_comm_all_ok(sv->comm, rc == PA_OK, &ok);
  if (err)
    return err;
  if (ok || rc)
    return rc;
  if (pa_service_stop_signal)
    return pa_error(PA_ECANCELED, "stopped by a signal");
  rc = pa_error(PA_EINVAL, "another rank %s (see its message)", what);
  if (sv->rank == 0)
    say_error(sv);
  return rc;
}

static int open_model(service *sv) {
  const pa_service_opts *o = sv->o;
  int rc = pa_model_open(o->model, &sv->model);
  const pa_chat_template *tmpl = rc ? NULL : pa_model_chat(sv->model);
  if (!rc && !tmpl)
    rc = pa_error(PA_ENOTFOUND, "%s: no chat template palign knows", o->model);
  /* the backend: on a GPU, the one of this worker's place among its node's workers */
  char be_err[256];
  const pa_backend *be =
      rc ? NULL : pa_backend_named(o->backend, pa_comm_local_worker(sv->comm), be_err, sizeof be_err);
  if (!rc && !be)
    rc = pa_error(PA_EINVAL, "%s", be_err);
  const int weights = pa_weight_format_parse(o->weights ? o->weights : "auto");
  if (!rc && weights < 0)
    rc = pa_error(PA_EINVAL, "weights are auto, fp32 or bf16, not '%s'", o->weights);
  if (!rc) {
    const int max_seq = pa_model_config_get(sv->model)->max_seq;
    /* the longest prompts (an ICL system prompt and a question) stay well under 4,096 tokens */
    rc = pa_lm_create(sv->model,
                      &(pa_lm_opts){.n_threads = o->threads,
                                    .max_seq = max_seq < 4096 ? max_seq : 4096,
                                    .backend = be,
                                    .weights = (pa_weight_format)weights},
                      &sv->lm);
    sv->be = be, sv->be_name = be->name;
  }
  pa_eval_opts eo = o->eval;
  eo.poll = worker_poll, eo.poll_ctx = sv;
  if (!rc)
    rc = pa_evaluator_create(sv->lm, pa_model_tokenizer(sv->model), tmpl, &eo, &sv->ev);
  return rc;
}

/* Whether the workers' GPUs exchange the bank's slices directly (NCCL):
 * when every worker runs on a GPU of its own (no more workers on a node
 * than it has devices) and the backend has the collectives; otherwise MPI
 * moves them in host memory. PALIGN_NCCL=0 never; =1 even for one worker
 * (a check of the path on one GPU). Collective over the job; failing to
 * join leaves the exchange to MPI. */
static int join_group(service *sv) {
  const char *env = getenv("PALIGN_NCCL");
  const bool never = env && !strcmp(env, "0"), force = env && !strcmp(env, "1");
  const bool worker = pa_comm_worker_index(sv->comm) >= 0;
  const pa_backend *be = sv->be;
  const bool can = !worker || (!never && be && be->group_join && be->group_id_bytes <= 256 &&
                               pa_comm_local_workers(sv->comm) <= pa_backend_devices(be));
  if (force && worker && !can && pa_comm_worker_index(sv->comm) == 0)
    fprintf(sv->log, "palign-worker: rank %d: PALIGN_NCCL=1, but %s; the activation bank goes over MPI\n", sv->rank,
            !be || !be->group_join ? "this backend has no collectives (a CPU, or palign built without NCCL)"
                                   : "a node has more workers than GPUs");
  int all = 0, joined = 0, err;
  if ((err = pa_comm_all_ok(sv->comm, can, &all)))
    return err;
  if (!all || (pa_comm_workers(sv->comm) < 2 && !force))
    return PA_OK;
  if (worker) {
    unsigned char id[1 + 256] = {0}; /* made: 1, then the id */
    if (pa_comm_worker_index(sv->comm) == 0 && !(id[0] = be->group_id(id + 1) == 0))
      fprintf(sv->log, "palign-worker: rank %d: NCCL: %s; the activation bank goes over MPI\n", sv->rank, be->error());
    if ((err = pa_comm_workers_bcast(sv->comm, id, 1 + be->group_id_bytes)))
      return err;
    if (id[0] && be->group_join(id + 1, pa_comm_workers(sv->comm), pa_comm_worker_index(sv->comm), &sv->group))
      fprintf(sv->log, "palign-worker: rank %d: NCCL: %s; the activation bank goes over MPI\n", sv->rank, be->error());
  }
  if ((err = pa_comm_all_ok(sv->comm, !worker || sv->group, &joined)))
    return err;
  if (!joined && sv->group) {
    be->group_leave(sv->group);
    sv->group = NULL;
  }
  return PA_OK;
}

/* pa_comm_workers_allgather's exchange, between the workers' GPUs: each
 * worker's slice uploaded (padded to the longest), one all-gather, every
 * slice downloaded into its place: the same bytes as over MPI. */
static int device_allgather(service *sv, float *buf, size_t per, int first, int n) {
  const pa_backend *be = sv->be;
  const int nw = pa_comm_workers(sv->comm);
  int mine[2] = {first, n}, *all = malloc((size_t)nw * 2 * sizeof *all), *oks = malloc((size_t)nw * sizeof *oks);
  if (!all || !oks) {
    fprintf(stderr, "palign-worker: no memory for the activation bank's exchange; stopping the job\n");
    pa_comm_abort(sv->comm, 1); /* the other workers are in the collective already */
  }
  int rc = pa_comm_workers_allgather_ints(sv->comm, mine, 2, all);
  int most = 0;
  for (int k = 0; !rc && k < nw; k++)
    most = all[2 * k + 1] > most ? all[2 * k + 1] : most;
  const size_t count = (size_t)most * per;
  float *send = rc ? NULL : be->alloc((count ? count : 1) * sizeof(float));
  float *recv = rc || !send ? NULL : be->alloc((count ? count : 1) * (size_t)nw * sizeof(float));
  int ok = send && recv;
  if (!rc && !ok) { /* this worker's own reason, before the others hear of it */
    pa_backend_enomem(be, "no memory for the activation bank's exchange");
    fprintf(stderr, "palign-worker: worker %d: %s\n", pa_comm_worker_index(sv->comm), pa_errmsg());
  }
  if (!rc && !(rc = pa_comm_workers_allgather_ints(sv->comm, &ok, 1, oks)))
    for (int k = 0; k < nw; k++)
      if (!oks[k])
        rc = pa_error(PA_ENOMEM, "worker %d had no %s memory for the activation bank's exchange (its message above)", k,
                      be->name);
  if (!rc) {
    be->upload(send, buf + (size_t)first * per, (size_t)n * per * sizeof(float));
    if (be->group_allgather(sv->group, send, count, recv))
      rc = pa_error(PA_EIO, "NCCL: %s", be->error());
  }
  for (int k = 0; !rc && k < nw; k++)
    be->download(buf + (size_t)all[2 * k] * per, recv + (size_t)k * count,
                 (size_t)all[2 * k + 1] * per * sizeof(float));
  be->release(send), be->release(recv);
  free(all), free(oks);
  return rc;
}

/* The bank from the store's cache, or computed in slices by the workers,
 * gathered, and saved by the first worker. Collective over the whole job. */
static int get_bank(service *sv) {
  const bool worker = pa_comm_worker_index(sv->comm) >= 0;
  char path[4096 + 64], name[64];
  const char *weights = sv->lm ? pa_lm_weights(sv->lm) : "fp32";
  pa_bank_file_name(sv->model_fp, weights, name, sizeof name);
  snprintf(path, sizeof path, "%s/%s", sv->o->store, name);
  pa_bank_key key;
  pa_bank_opts bo = {.progress = bank_progress, .progress_ctx = sv, .weights = weights};
  int rc = PA_OK, loaded = 1, all_loaded = 0;
  if (worker) {
    rc = pa_bank_key_make(sv->model_fp, pa_model_config_get(sv->model), pa_model_tokenizer(sv->model),
                          pa_model_chat(sv->model), sv->inv, &bo, &key);
    if (!rc)
      rc = pa_bank_load(path, &key, &sv->bank);
    loaded = rc == PA_OK;
    if (rc == PA_ENOTFOUND) {
      pa_error_clear();
      rc = PA_OK;
    }
  }
  int err;
  if ((rc = all_ok(sv, rc, "could not read the activation bank")))
    return rc;
  if ((err = pa_comm_all_ok(sv->comm, loaded, &all_loaded)))
    return err;
  if (all_loaded) {
    if (worker && pa_comm_worker_index(sv->comm) == 0)
      fprintf(sv->log, "activation bank read from %s\n", path);
  } else {
    const double t0 = now_s();
    if ((rc = join_group(sv)))
      return rc;
    if (worker) {
      pa_bank_destroy(sv->bank);
      sv->bank = NULL;
      bo.slice = pa_comm_worker_index(sv->comm);
      bo.n_slices = pa_comm_workers(sv->comm);
      rc = pa_bank_compute(sv->lm, pa_model_tokenizer(sv->model), pa_model_chat(sv->model), sv->inv, &bo, &sv->bank);
    }
    /* gathered only when every slice was computed: a worker that failed (or
     * was stopped) must not leave the others waiting in the gather */
    if ((rc = all_ok(sv, rc, "could not compute its part of the activation bank")))
      return rc;
    if (worker) {
      int first = 0, n = 0;
      pa_bank_slice(sv->bank, &first, &n);
      const pa_pas_bank v = pa_bank_view(sv->bank);
      const size_t per = (size_t)v.n_layers * v.n_heads * v.head_dim;
      rc = sv->group ? device_allgather(sv, pa_bank_data_mut(sv->bank), per, first, n)
                     : pa_comm_workers_allgather(sv->comm, pa_bank_data_mut(sv->bank), per, first, n);
      if (!rc) {
        pa_bank_stats st = *pa_bank_stats_get(sv->bank);
        st.seconds = now_s() - t0; /* the gathered bank's wall time */
        pa_bank_set_stats(sv->bank, &st);
        if (pa_comm_worker_index(sv->comm) == 0) {
          rc = pa_bank_save(sv->bank, path, &key);
          if (!rc)
            fprintf(sv->log, "activation bank computed by %d worker(s) in %.1f s (gathered over %s) and saved to %s\n",
                    pa_comm_workers(sv->comm), st.seconds, sv->group ? "NCCL" : "MPI", path);
        }
      }
    }
    if ((rc = all_ok(sv, rc, "could not gather or save the activation bank")))
      return rc;
  }
  if (worker) {
    sv->bank_view = pa_bank_view(sv->bank);
    sv->ctx.bank = &sv->bank_view;
  }
  return PA_OK;
}

/* Every worker must hold its weights in one format: the slices of one bank
 * come from one, and a store holds one (with --backend auto and --weights
 * auto, a worker without a GPU would hold fp32 where the others hold bf16).
 * *format is the one ("fp32" or "bf16"). Collective over the job. */
static int same_weights(service *sv, const char **format) {
  const bool worker = pa_comm_worker_index(sv->comm) >= 0;
  const bool bf16 = worker && sv->lm && !strcmp(pa_lm_weights(sv->lm), "bf16"), fp32 = worker && !bf16;
  int all_bf16 = 0, all_fp32 = 0, err;
  if ((err = pa_comm_all_ok(sv->comm, !fp32, &all_bf16)) || (err = pa_comm_all_ok(sv->comm, !bf16, &all_fp32)))
    return err;
  *format = all_bf16 ? "bf16" : "fp32";
  if (all_bf16 || all_fp32)
    return PA_OK;
  if (sv->rank == 0)
    fprintf(sv->log, "palign-worker: the workers hold their weights in different formats (bf16 on some, fp32 on "
                     "others, as on a GPU and on the CPU): give --weights fp32 or --weights bf16\n");
  return pa_error(PA_EINVAL, "the workers hold their weights in different formats");
}

/* A record holds at most PA_STORE_MAX_RECORD bytes, of which DPO's adapter
 * (4 bytes a value) is nearly all; the rest (answers, probabilities, PAS's
 * grid, the loss curve) is under 3 MiB even at the settings' extremes (a
 * loss a step over 1,000 epochs of batch 1: 2.4 MB; 64 alphas: 0.3 MB), so
 * 4 MiB are kept for it. A rank the store cannot hold is refused before
 * anything is written, not found subject by subject. */
static int dpo_fits_a_record(const service *sv) {
  const pa_model_config *c = pa_model_config_get(sv->model);
  const double q = (double)c->n_heads * c->head_dim, kv = (double)c->n_kv_heads * c->head_dim;
  const double per_rank = 4.0 * c->n_layers * ((c->dim + q) + 2 * (c->dim + kv) + (q + c->dim)); /* bytes */
  const double room = (double)PA_STORE_MAX_RECORD - (4 << 20);
  if (per_rank * sv->dpo_opts.rank <= room)
    return PA_OK;
  const int most = (int)(room / per_rank);
  char hint[64] = "no rank fits";
  if (most >= 1)
    snprintf(hint, sizeof hint, "give --dpo-rank %d or less", most);
  return pa_error(PA_EINVAL,
                  "DPO's adapter at rank %d is %.1f MiB on this model: more than a store record holds beside the "
                  "rest of a subject's results (%u MiB in all); %s",
                  sv->dpo_opts.rank, per_rank * sv->dpo_opts.rank / (1 << 20), PA_STORE_MAX_RECORD >> 20, hint);
}

static int setup_worker(service *sv) {
  int rc = sv->need_model ? open_model(sv) : PA_OK;
  if (!rc && sv->need_dpo)
    rc = dpo_fits_a_record(sv);
  sv->ctx = (pa_method_ctx){.inv = sv->inv,
                            .ev = sv->ev,
                            .pas = {.run_seed = sv->o->seed,
                                    .holdout_per_trait = sv->o->holdout_per_trait,
                                    .n_threads = sv->o->threads,
                                    .alphas = sv->o->alphas,
                                    .n_alphas = sv->o->n_alphas,
                                    .variants = pa_methods_pas_variants(sv->methods, sv->n_methods)},
                            .pas_result = &sv->pas,
                            .dpo = sv->dpo_opts,
                            .dpo_result = &sv->dpo};
  for (int r = 0; !rc && r < PA_METHOD_MAX_ROWS; r++) {
    sv->mo.preds[r] = malloc((size_t)sv->n_test * sizeof *sv->mo.preds[r]);
    sv->mo.probs[r] = malloc((size_t)sv->n_test * 5 * sizeof *sv->mo.probs[r]);
    if (!sv->mo.preds[r] || !sv->mo.probs[r])
      rc = pa_error(PA_ENOMEM, "no memory");
  }
  if (!rc)
    rc = pa_shard_open(sv->o->store, sv->run, sv->size == 1 ? 0 : sv->rank, &sv->shard);
  if (!rc)
    pa_shard_set_limit(sv->shard, sv->o->shard_bytes);
  return rc;
}

static void teardown_worker(service *sv) {
  pa_shard_close(sv->shard);
  for (int r = 0; r < PA_METHOD_MAX_ROWS; r++)
    free(sv->mo.preds[r]), free(sv->mo.probs[r]);
  pa_pas_result_free(&sv->pas);
  pa_dpo_result_free(&sv->dpo);
  pa_bank_destroy(sv->bank);
  pa_evaluator_destroy(sv->ev);
  if (sv->group)
    sv->be->group_leave(sv->group);
  pa_lm_destroy(sv->lm);
  pa_model_close(sv->model);
}

/* A subject's outcome: stored with every method's rows, stored with a
 * method failed (the others' rows are there: done, and counted apart),
 * stored as failed (the subject could not be done at all), or not stored. */
enum { SUBJECT_DONE, SUBJECT_PARTIAL, SUBJECT_FAILED, SUBJECT_ABANDONED };

static void method_done(void *ctx, const pa_subject *s, const char *method, const pa_method_out *mo, int failed) {
  service *sv = ctx;
  if (failed)
    fprintf(sv->log, "palign-worker: rank %d: subject %s, method %s failed: %s\n", sv->rank, s->id, method,
            pa_errmsg());
}

/* The benchmark mode's stand-in for a subject's model work: a delay drawn
 * from the log-normal distribution of mean benchmark_delay and coefficient
 * of variation benchmark_cv, the same for a subject in every run (a hash of
 * the run seed and the subject's position), slept in slices with the
 * heartbeats a busy worker sends (*slept: the delay). Returns 1 when a
 * signal came. */
static int benchmark_sleep(service *sv, size_t index, double *slept) {
  uint64_t x = sv->o->seed * 0x9E3779B97F4A7C15ULL ^ (uint64_t)index;
  double u[2];
  for (int k = 0; k < 2; k++) /* two uniforms in (0, 1) */
    u[k] = ((double)(pa_splitmix64(&x) >> 11) + 0.5) / 9007199254740992.0;
  const double cv = sv->o->benchmark_cv, s2 = log1p(cv * cv);
  const double normal = sqrt(-2 * log(u[0])) * cos(6.283185307179586 * u[1]);
  const double delay = exp(log(sv->o->benchmark_delay) - s2 / 2 + sqrt(s2) * normal);
  *slept = delay;
  for (const double t_end = now_s() + delay;;) {
    const double left = t_end - now_s();
    if (left <= 0)
      return 0;
    if (worker_poll(sv))
      return 1;
    const double slice = left < 0.05 ? left : 0.05;
    nanosleep(&(struct timespec){.tv_sec = 0, .tv_nsec = (long)(slice * 1e9)}, NULL);
  }
}

/* One subject, start to stored record. Negative: an error that stops this worker. */
static int do_subject(service *sv, size_t index) {
  const pa_subject *s = pa_subjects_at(sv->subjects, index);
  snprintf(sv->current, sizeof sv->current, "%s", s->id);
  pa_record *rec = NULL;
  int rc = pa_record_create(s, (int64_t)index, sv->o->seed, sv->model_fp, &rec);
  if (rc)
    return rc;
  Palign__SubjectResult *msg = pa_record_message(rec);
  msg->rank = sv->rank;
  if (sv->lm) {
    msg->backend = (char *)sv->be_name;
    msg->weights = (char *)pa_lm_weights(sv->lm);
    msg->batch = sv->ev ? pa_evaluator_opts(sv->ev)->batch : 0;
  }
  int outcome = SUBJECT_DONE;
  if (!s->usable) {
    msg->failed = true;
    msg->error = (char *)s->reason;
    outcome = SUBJECT_FAILED;
  } else {
    double slept = 0;
    if (sv->o->benchmark_delay > 0 && benchmark_sleep(sv, index, &slept)) {
      pa_record_destroy(rec);
      sv->current[0] = '\0';
      return SUBJECT_ABANDONED;
    }
    int n_failed =
        pa_subject_run(&sv->ctx, sv->methods, sv->n_methods, s, sv->test, sv->n_test, &sv->mo, rec, method_done, sv);
    if (n_failed == PA_ECANCELED) {
      pa_record_destroy(rec);
      sv->current[0] = '\0';
      return SUBJECT_ABANDONED;
    }
    if (n_failed < 0) {
      pa_record_destroy(rec);
      return n_failed;
    }
    msg->seconds += slept; /* the record's wall time includes the benchmark's stand-in */
    outcome = n_failed ? SUBJECT_PARTIAL : SUBJECT_DONE;
  }
  rc = pa_shard_append(sv->shard, msg);
  pa_record_destroy(rec);
  sv->current[0] = '\0';
  return rc ? rc : outcome;
}

/* A worker rank's loop: chunks from rank 0 until told to stop. */
static int worker_loop(service *sv) {
  int rc = PA_OK;
  for (;;) {
    Palign__Work *w = NULL;
    if ((rc = pa_comm_recv_work(sv->comm, &w))) { /* told, rank 0 gives this worker's subjects to the others */
      Palign__Report r = PALIGN__REPORT__INIT;
      r.rank = sv->rank;
      r.error = (char *)pa_errmsg();
      tell_rank0(sv, &r);
      return rc;
    }
    const bool stop = w->stop;
    for (size_t i = 0; !stop && i < w->n_subject_index && !rc; i++) {
      Palign__Report r = PALIGN__REPORT__INIT;
      r.rank = sv->rank;
      char *id = (char *)pa_subjects_at(sv->subjects, (size_t)w->subject_index[i])->id;
      int out = pa_service_stop_signal ? SUBJECT_ABANDONED : do_subject(sv, (size_t)w->subject_index[i]);
      if (out < 0) {
        r.error = (char *)pa_errmsg();
        rc = out;
      } else if (out == SUBJECT_ABANDONED) {
        r.stopping = true;
        rc = PA_ECANCELED;
      } else {
        if (out == SUBJECT_DONE)
          r.done = &id, r.n_done = 1;
        else if (out == SUBJECT_PARTIAL)
          r.partial = &id, r.n_partial = 1;
        else
          r.failed = &id, r.n_failed = 1;
        r.idle = i + 1 == w->n_subject_index;
      }
      tell_rank0(sv, &r);
      sv->last_beat = now_s();
    }
    palign__work__free_unpacked(w, NULL);
    if (stop && !rc && pa_service_stop_signal)
      return PA_ECANCELED; /* told to stop because of the signal: exits as interrupted */
    if (stop || rc)
      return rc;
  }
}

/* ---- the coordinator ------------------------------------------------------------ */

typedef struct worker_state {
  double last_seen;
  bool warned, stopped, idle;
  char current[64];
  size_t *chunk; /* assigned, not yet reported */
  size_t n_chunk;
} worker_state;

typedef struct progress {
  size_t total, done, failed, stored_before;
  size_t partial; /* of done: with a method failed */
  long reports; /* messages the coordinator handled */
  double busy;  /* seconds spent handling them (bookkeeping, handing out, printing), waiting excluded */
  double t0, last_line;
  double t_last; /* when a subject last finished (t0 before any did) */
} progress;

static void print_progress(service *sv, progress *p, const worker_state *ws, int n_workers, bool force) {
  const double t = now_s(), every = sv->o->progress_every > 0 ? sv->o->progress_every : 10;
  if (!force && t - p->last_line < every)
    return;
  p->last_line = t;
  const size_t finished = p->done + p->failed, left = p->total - finished;
  const double rate = finished > 0 ? (double)finished / (t - p->t0) : 0;
  /* the time left at the pace up to the last finished subject, less the
   * time since: it counts down between subjects instead of growing while
   * one is in progress */
  char eta[64] = "time left unknown";
  const double pace = finished > 0 ? (p->t_last - p->t0) / (double)finished : 0,
               secs = fmax(pace * (double)left - (t - p->t_last), 0);
  if (rate > 0 && secs < 120)
    snprintf(eta, sizeof eta, "about %.0f s left", secs);
  else if (rate > 0)
    snprintf(eta, sizeof eta, "about %.0f min left", secs / 60);
  char partial[64] = "";
  if (p->partial)
    snprintf(partial, sizeof partial, " (%zu with a method failed)", p->partial);
  fprintf(sv->log, "[%.0f s] %zu/%zu subjects done%s, %zu failed, %zu left; %.1f subjects/h; %s", t - p->t0, p->done,
          p->total, partial, p->failed, left, rate * 3600, eta);
  if (!ws && sv->current[0])
    fprintf(sv->log, "; on subject %s", sv->current);
  for (int w = 0; ws && w < n_workers; w++)
    if (!ws[w].stopped)
      fprintf(sv->log, "; rank %d: %s, %.0f s ago", w + 1, ws[w].current[0] ? ws[w].current : "idle",
              t - ws[w].last_seen);
  fputc('\n', sv->log);
  fflush(sv->log);
}

/* One rank: the coordinator does the work itself. */
static int serve_alone(service *sv, const size_t *todo, size_t n_todo, progress *p) {
  sv->alone = p;
  for (size_t k = 0; k < n_todo; k++) {
    if (pa_service_stop_signal)
      return PA_ECANCELED;
    int out = do_subject(sv, todo[k]);
    if (out < 0)
      return out;
    if (out == SUBJECT_ABANDONED)
      return PA_ECANCELED;
    *(out == SUBJECT_FAILED ? &p->failed : &p->done) += 1;
    p->partial += out == SUBJECT_PARTIAL;
    p->t_last = now_s();
    print_progress(sv, p, NULL, 0, false);
  }
  return PA_OK;
}

static int chunk_size(const service *sv, size_t left, int workers) {
  if (sv->o->chunk > 0)
    return sv->o->chunk;
  size_t c = left / ((size_t)workers * 4); /* about four hand-outs per worker keeps the tail short */
  return c < 1 ? 1 : c > 16 ? 16 : (int)c;
}

/* Work for worker w. Work that cannot be sent stops the job: the worker
 * would wait for it for ever. */
static void tell_worker(service *sv, int w, const Palign__Work *work) {
  if (pa_comm_send_work(sv->comm, w + 1, work)) {
    say_error(sv);
    fprintf(sv->log, "palign-worker: rank 0 cannot hand work to rank %d; stopping the job\n", w + 1);
    pa_comm_abort(sv->comm, 1);
  }
}

/* Sends worker w its next chunk from the queue, or stop; with nothing
 * queued and not stopping, w waits idle (a stopped worker's chunk may come
 * back to the queue). */
static void hand_out(service *sv, worker_state *ws, int w, size_t *queue, size_t *n_queue, bool stopping) {
  Palign__Work work = PALIGN__WORK__INIT;
  int64_t idx[64];
  ws[w].n_chunk = 0;
  ws[w].idle = false;
  if (!stopping && *n_queue == 0) {
    ws[w].idle = true;
    ws[w].current[0] = '\0';
    return;
  }
  if (stopping) {
    work.stop = true;
    ws[w].stopped = true;
  } else {
    int c = chunk_size(sv, *n_queue, pa_comm_workers(sv->comm));
    c = c > 64 ? 64 : c;
    for (int i = 0; i<c && * n_queue> 0; i++) {
      size_t s = queue[--*n_queue];
      idx[i] = (int64_t)s;
      ws[w].chunk[ws[w].n_chunk++] = s;
    }
    work.n_subject_index = ws[w].n_chunk;
    work.subject_index = idx;
    snprintf(ws[w].current, sizeof ws[w].current, "%s", pa_subjects_at(sv->subjects, ws[w].chunk[0])->id);
  }
  sv->hand_outs++;
  tell_worker(sv, w, &work);
}

/* Removes the subject with id from w's chunk. */
static void chunk_remove(service *sv, worker_state *ws, const char *id) {
  for (size_t i = 0; i < ws->n_chunk; i++)
    if (!strcmp(pa_subjects_at(sv->subjects, ws->chunk[i])->id, id)) {
      /* in order: chunk[0] is what the worker does next */
      memmove(ws->chunk + i, ws->chunk + i + 1, (ws->n_chunk - i - 1) * sizeof *ws->chunk);
      ws->n_chunk--;
      return;
    }
}

static int coordinate(service *sv, const size_t *todo, size_t n_todo, progress *p) {
  const int nw = pa_comm_workers(sv->comm);
  /* the queue is popped from its end: reverse so subjects go out in file order */
  size_t *queue = malloc((n_todo + 1) * sizeof *queue), n_queue = n_todo;
  worker_state *ws = calloc((size_t)nw, sizeof *ws);
  int rc = queue && ws ? PA_OK : pa_error(PA_ENOMEM, "no memory");
  for (size_t i = 0; !rc && i < n_todo; i++)
    queue[i] = todo[n_todo - 1 - i];
  for (int w = 0; !rc && w < nw; w++) {
    if (!(ws[w].chunk = malloc(64 * sizeof *ws[w].chunk)))
      rc = pa_error(PA_ENOMEM, "no memory");
    ws[w].last_seen = now_s();
  }
  for (int w = 0; !rc && w < nw; w++)
    hand_out(sv, ws, w, queue, &n_queue, pa_service_stop_signal != 0);
  int active = 0, fatal = PA_OK;
  for (int w = 0; !rc && w < nw; w++)
    active += !ws[w].stopped;
  const double silent = sv->o->silent_after > 0 ? sv->o->silent_after : 120;
  while (!rc && active > 0) {
    Palign__Report *r = NULL;
    if ((rc = pa_comm_recv_report(sv->comm, 0.5, &r)))
      break;
    const double t = now_s(); /* waiting is not work: the handling is timed from here */
    const bool r_seen = r != NULL;
    if (r) {
      const int w = r->rank - 1;
      if (w < 0 || w >= nw || ws[w].stopped) {
        palign__report__free_unpacked(r, NULL);
        continue;
      }
      ws[w].last_seen = t;
      if (ws[w].warned)
        fprintf(sv->log, "palign-worker: rank %d answers again\n", r->rank);
      ws[w].warned = false;
      if (r->n_done || r->n_partial || r->n_failed)
        p->t_last = t;
      for (size_t i = 0; i < r->n_done; i++, p->done++)
        chunk_remove(sv, &ws[w], r->done[i]);
      for (size_t i = 0; i < r->n_partial; i++, p->done++, p->partial++)
        chunk_remove(sv, &ws[w], r->partial[i]);
      for (size_t i = 0; i < r->n_failed; i++, p->failed++) {
        chunk_remove(sv, &ws[w], r->failed[i]);
        fprintf(sv->log, "palign-worker: subject %s failed on rank %d (stored as failed)\n", r->failed[i], r->rank);
      }
      if (r->current && r->current[0])
        snprintf(ws[w].current, sizeof ws[w].current, "%s", r->current);
      else if (ws[w].n_chunk)
        snprintf(ws[w].current, sizeof ws[w].current, "%s", pa_subjects_at(sv->subjects, ws[w].chunk[0])->id);
      if ((r->error && r->error[0]) || r->stopping) {
        if (r->error && r->error[0]) {
          fprintf(sv->log, "palign-worker: rank %d stopped: %s\n", r->rank, r->error);
          if (!sv->run_error[0])
            snprintf(sv->run_error, sizeof sv->run_error, "rank %d: %s", r->rank, r->error);
          fatal = PA_EIO;
        }
        /* whatever it had not finished goes to the others */
        for (size_t i = 0; i < ws[w].n_chunk; i++)
          queue[n_queue++] = ws[w].chunk[i];
        ws[w].n_chunk = 0;
        ws[w].stopped = true;
        active--;
      } else if (r->idle) {
        ws[w].current[0] = '\0';
        hand_out(sv, ws, w, queue, &n_queue, pa_service_stop_signal != 0);
        active -= ws[w].stopped;
      }
      palign__report__free_unpacked(r, NULL);
    }
    /* idle workers take what came back to the queue (a stopped worker's
     * unfinished subjects); when nobody is busy any more (or on a signal)
     * they are told to stop */
    bool busy = false;
    for (int w = 0; w < nw; w++)
      busy |= !ws[w].stopped && !ws[w].idle;
    for (int w = 0; !rc && w < nw; w++)
      if (ws[w].idle && (n_queue > 0 || !busy || pa_service_stop_signal)) {
        hand_out(sv, ws, w, queue, &n_queue, (!busy && n_queue == 0) || pa_service_stop_signal);
        active -= ws[w].stopped;
      }
    for (int w = 0; w < nw; w++)
      if (!ws[w].stopped && !ws[w].idle && !ws[w].warned && t - ws[w].last_seen > silent) {
        fprintf(sv->log, "palign-worker: rank %d has not answered for %.0f s (on subject %s)\n", w + 1,
                t - ws[w].last_seen, ws[w].current[0] ? ws[w].current : "none");
        ws[w].warned = true;
      }
    print_progress(sv, p, ws, nw, false);
    if (r_seen) {
      p->reports++;
      p->busy += now_s() - t;
    }
  }
  if (rc && !ws) { /* no memory to follow the workers: they cannot be told to stop */
    say_error(sv);
    pa_comm_abort(sv->comm, 1);
  }
  if (rc) { /* rank 0 cannot go on: the workers must not wait for work for ever */
    Palign__Work stop = PALIGN__WORK__INIT;
    stop.stop = true;
    for (int w = 0; w < nw; w++)
      if (!ws[w].stopped)
        tell_worker(sv, w, &stop);
  }
  for (int w = 0; ws && w < nw; w++)
    free(ws[w].chunk);
  free(ws), free(queue);
  if (rc)
    return rc;
  if (fatal)
    return pa_error(fatal, "a worker stopped with an error (see above)");
  /* a signal after the last subject was stored interrupts nothing */
  return pa_service_stop_signal && p->done + p->failed < p->total ? PA_ECANCELED : PA_OK;
}

/* ---- the whole run ----------------------------------------------------------------- */

int pa_service_run(pa_comm *comm, const pa_service_opts *o) {
  service sv_ = {.o = o, .comm = comm, .log = o->log ? o->log : stderr}, *sv = &sv_;
  sv->rank = pa_comm_rank(comm), sv->size = pa_comm_size(comm);
  struct sigaction sa = {.sa_handler = on_signal};
  sigemptyset(&sa.sa_mask);
  sigaction(SIGTERM, &sa, NULL);
  sigaction(SIGINT, &sa, NULL);

  /* Every rank reads the data; rank 0 fingerprints the model, takes the
   * store's lock, checks its settings, numbers the run and finds what is
   * left to do. */
  int rc = load_data(sv);
  run_manifest rm = {0};
  pa_store_guard *guard = NULL;
  size_t *todo = NULL, n_todo = 0, n_stored = 0;
  char own_fp[65] = "none"; /* a worker's own model, fingerprinted while rank 0 does the same */
  if (sv->rank == 0) {
    if (!rc && sv->need_model)
      rc = pa_model_fingerprint(o->model, sv->model_fp);
    else if (!rc)
      snprintf(sv->model_fp, sizeof sv->model_fp, "none");
    if (!rc)
      rc = pa_store_lock(o->store, &guard);
    if (!rc)
      rc = plan_run(sv, &rm);
    if (!rc)
      rc = subjects_to_do(sv, rm.old && rm.old->settings, &todo, &n_todo, &n_stored);
  } else if (!rc && sv->need_model) {
    rc = pa_model_fingerprint(o->model, own_fp);
  }
  if (rc)
    say_error(sv);
  int32_t hdr[2] = {rc, sv->run};
  int err;
  if ((err = pa_comm_bcast(comm, hdr, sizeof hdr)) || (err = pa_comm_bcast(comm, sv->model_fp, sizeof sv->model_fp)))
    rc = err;
  sv->run = hdr[1];
  if (sv->size > 1 && !err) {
    const int arc = agree_with_rank0(sv, rc, own_fp);
    if (arc && !rc)
      say_error(sv);
    rc = rc ? rc : arc;
  }
  /* all go on, or all stop: rank 0's verdict and every rank's own loading */
  rc = all_ok(sv, rc ? rc : hdr[0] ? PA_EINVAL : PA_OK, "could not load the data");

  /* The workers get ready (model, evaluator, a new shard each); only then
   * does the manifest list the run, so a run that cannot start leaves the
   * store as it was. */
  const bool worker = pa_comm_worker_index(comm) >= 0;
  bool started = false;
  if (!rc) {
    if (worker && (rc = setup_worker(sv)))
      say_error(sv);
    rc = all_ok(sv, rc, "could not start");
    /* the store's settings again, with the weight format the workers resolved */
    const char *format = "";
    if (!rc && sv->need_model)
      rc = same_weights(sv, &format);
    int src = PA_OK;
    if (!rc && sv->rank == 0 && sv->need_model) {
      rm.settings.weights = (char *)format;
      if (rm.old && rm.old->settings && (src = pa_settings_check(o->store, rm.old->settings, &rm.settings)))
        say_error(sv);
    }
    if (!rc)
      rc = all_ok(sv, src, "found other settings in the store");
    /* the bank is part of getting ready: one that cannot be read, or a
     * signal while it is computed, leaves the store as it was */
    if (!rc && sv->need_bank && (rc = get_bank(sv)) && rc != PA_ECANCELED)
      say_error(sv);
    /* a signal while the workers got ready (a model loads for a while)
     * stops the job here, every rank as stopped, so that the store stays
     * as it was */
    int ok = 1;
    if (!rc && (rc = pa_comm_all_ok(comm, !pa_service_stop_signal, &ok)) == PA_OK && !ok)
      rc = pa_error(PA_ECANCELED, "stopped by a signal");
    int wrc = PA_OK;
    if (!rc && sv->rank == 0 && ((wrc = shards_in_store(sv, &rm)) || (wrc = pa_manifest_write(o->store, &rm.m))))
      say_error(sv);
    if (!rc)
      rc = all_ok(sv, wrc, "could not write the manifest");
    started = rc == PA_OK;
    if (started && sv->rank == 0)
      fprintf(sv->log,
              "palign-worker: run %d on %s: %zu subjects asked for, %zu already stored, %zu to do; %d worker(s); "
              "methods %s\n",
              sv->run, o->store, sv->last - sv->first + 1, n_stored, n_todo, pa_comm_workers(comm), o->methods);
    if (!started && worker) {
      if (pa_shard_discard(sv->shard))
        say_error(sv);
      sv->shard = NULL;
    }
  }
  progress p = {.total = n_todo, .t0 = now_s(), .stored_before = n_stored};
  p.t_last = p.t0;
  if (!rc) {
    if (sv->size == 1)
      rc = serve_alone(sv, todo, n_todo, &p);
    else if (sv->rank == 0)
      rc = coordinate(sv, todo, n_todo, &p);
    else
      rc = worker_loop(sv);
    if (rc && rc != PA_ECANCELED)
      say_error(sv);
  }
  if (worker)
    teardown_worker(sv);
  if (sv->rank == 0 && started) {
    const bool interrupted = rc == PA_ECANCELED;
    print_progress(sv, &p, NULL, 0, true);
    if (p.reports > 0) {
      const double n = p.done + p.failed > 0 ? (double)(p.done + p.failed) : 1;
      fprintf(sv->log,
              "coordinator: %ld messages handled, %.1f us each, %.1f us per subject finished; per subject "
              "%.2f reports (heartbeats included) and %.3f hand-outs; files: %d shards this run (each in parts of at "
              "most %.0f MiB), one fsync'd append per subject, the manifest written twice\n",
              p.reports, 1e6 * p.busy / (double)p.reports, 1e6 * p.busy / n, (double)p.reports / n,
              (double)sv->hand_outs / n, pa_comm_workers(comm),
              (double)(o->shard_bytes ? o->shard_bytes : PA_STORE_SHARD_BYTES) / (1 << 20));
    }
    if (interrupted)
      fprintf(sv->log, "palign-worker: stopped by signal %d; a rerun with the same store resumes\n",
              (int)pa_service_stop_signal);
    /* an error's message: a worker's own, else what this rank said */
    const char *error = !rc || interrupted ? NULL : sv->run_error[0] ? sv->run_error : sv->said;
    int mrc = end_run(sv, &rm, (long)p.done, (long)p.failed, interrupted, error);
    if (mrc)
      say_error(sv);
    if (!rc)
      rc = mrc;
  }
  if (sv->rank == 0 && !started && rc == PA_ECANCELED)
    fprintf(sv->log, "palign-worker: stopped by signal %d before the run started; the store is as it was\n",
            (int)pa_service_stop_signal);
  pa_store_unlock(guard);
  free(todo);
  run_manifest_free(&rm);
  pa_subjects_destroy(sv->subjects);
  pa_inventory_destroy(sv->inv);
  return rc;
}
