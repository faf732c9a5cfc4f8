/* tu_train_compare.h: the trainer's fixture (a tiny llama or qwen2 model,
 * palign mkmodel; a 12-token prefix and three sequences, two logits wanted
 * of each, a rank-4 adapter with B set so that every entry has a gradient)
 * and the trainer on the CPU against another backend on the same batch and
 * adapter, and the optimiser where the trainer runs against steps by hand.
 * Used by test_train.c (a CPU backend posing as a device) and
 * test_cuda_train.c (the GPU). Include after testutil.h. */
#ifndef PALIGN_TU_TRAIN_COMPARE_H
#define PALIGN_TU_TRAIN_COMPARE_H

#include <math.h>
#include <stdio.h>
#include <string.h>

#include "backend.h"
#include "forward.h"
#include "lora.h"
#include "mkmodel.h"
#include "model.h"
#include "status.h"
#include "train.h"

static uint64_t rng = 12345;
static inline double urand(void) {
  rng ^= rng << 13, rng ^= rng >> 7, rng ^= rng << 17;
  return (double)(rng >> 11) / 9007199254740992.0;
}

typedef struct {
  pa_model *m;
  pa_lm *lm;
  pa_trainer *tr;
  pa_lora *lora, *grad;
  /* the batch: a prefix and three sequences, two logits wanted per sequence */
  int32_t prefix[12], seq[3][9], out[3 * 2];
  const int32_t *tokens[3];
  int n_tokens[3];
  pa_train_batch b;
  float coef[3 * 2];
} fixture;

static inline void fixture_make(fixture *f, pa_mkmodel_arch arch, const char *name) {
  memset(f, 0, sizeof *f);
  char path[300];
  pa_mkmodel_opts o = pa_mkmodel_defaults();
  o.arch = arch, o.n_layers = 2, o.dim = 32, o.n_heads = 4, o.n_kv_heads = 2, o.ffn_dim = 48, o.seed = 3;
  o.tied = arch == PA_MK_LLAMA;
  o.force = true;
  if (pa_mkmodel_write_gguf(&o, tu_path(path, sizeof path, name)) || pa_model_open(path, &f->m) ||
      pa_lm_create(f->m, &(pa_lm_opts){.n_threads = 2, .max_seq = 256}, &f->lm))
    fail_msg("%s", pa_errmsg());
  const int V = pa_lm_config(f->lm)->vocab_size;
  for (int i = 0; i < 12; i++)
    f->prefix[i] = (int32_t)(urand() * V);
  const int lens[3] = {9, 4, 1};
  for (int s = 0; s < 3; s++) {
    for (int j = 0; j < lens[s]; j++)
      f->seq[s][j] = (int32_t)(urand() * V);
    f->tokens[s] = f->seq[s];
    f->n_tokens[s] = lens[s];
    for (int j = 0; j < 2; j++) {
      f->out[s * 2 + j] = (int32_t)(urand() * V);
      f->coef[s * 2 + j] = (float)(2 * urand() - 1);
    }
  }
  f->b = (pa_train_batch){.prefix = f->prefix,
                          .n_prefix = 12,
                          .tokens = f->tokens,
                          .n_tokens = f->n_tokens,
                          .n_seqs = 3,
                          .out = f->out,
                          .n_out = 2};
  const pa_train_plan plan = {.max_prefix = 21, .max_seqs = 3, .max_seq_len = 21, .max_out = 2, .rank = 4};
  if (pa_trainer_create(f->lm, &plan, &f->tr) || pa_lora_create(pa_lm_config(f->lm), 4, 2.0f, &f->lora) ||
      pa_lora_create_like(f->lora, &f->grad))
    fail_msg("%s", pa_errmsg());
  pa_lora_init(f->lora, 9);
  /* B nonzero (training's start has B = 0, which would leave every A's gradient 0) */
  for (int l = 0; l < f->lora->n_layers; l++)
    for (int t = 0; t < PA_LORA_N_TARGETS; t++) {
      float *bm = pa_lora_b(f->lora, l, t);
      for (int i = 0; i < f->lora->out[t] * f->lora->rank; i++)
        bm[i] = (float)(urand() - 0.5);
    }
}

static inline void fixture_free(fixture *f) {
  pa_lora_destroy(f->lora);
  pa_lora_destroy(f->grad);
  pa_trainer_destroy(f->tr);
  pa_lm_destroy(f->lm);
  pa_model_close(f->m);
}

/* The trainer on the CPU and on backend `other`, both with weights in
 * format wf, from the same fixture: the wanted logits within logit_tol of
 * their largest and the gradients (written over a gradient holding 0.25
 * everywhere: backward reads none of it) within grad_tol of the largest
 * entry. The gradients come back in g_other and g_cpu (the caller frees
 * them). */
static inline void tu_train_compare(const pa_backend *other, pa_weight_format wf, double logit_tol, double grad_tol,
                                    pa_lora **g_other, pa_lora **g_cpu) {
  rng = 4242; /* the same batch and adapter on every call */
  fixture f;
  fixture_make(&f, PA_MK_QWEN2, "compare.gguf");
  pa_lm *lm[2];
  pa_trainer *tr[2];
  const pa_train_plan plan = {.max_prefix = 21, .max_seqs = 3, .max_seq_len = 21, .max_out = 2, .rank = 4};
  const pa_backend *be[2] = {pa_backend_cpu(), other};
  for (int k = 0; k < 2; k++)
    if (pa_lm_create(f.m, &(pa_lm_opts){.n_threads = 2, .max_seq = 256, .backend = be[k], .weights = wf}, &lm[k]) ||
        pa_trainer_create(lm[k], &plan, &tr[k]))
      fail_msg("%s backend: %s", be[k]->name, pa_errmsg());
  pa_lora *g[2];
  float lg[2][6];
  for (int k = 0; k < 2; k++) {
    assert_int_equal(pa_lora_create_like(f.lora, &g[k]), PA_OK);
    for (size_t i = 0; i < g[k]->n_floats; i++)
      g[k]->arena[i] = 0.25f;
    if (pa_trainer_forward(tr[k], f.lora, &f.b, lg[k]) || pa_trainer_backward(tr[k], f.coef, g[k]))
      fail_msg("%s backend: %s", be[k]->name, pa_errmsg());
  }
  double lmx = 0, mx = 0, worst = 0;
  for (int i = 0; i < 6; i++)
    lmx = fmax(lmx, fabs(lg[0][i]));
  for (int i = 0; i < 6; i++)
    if (!(fabs((double)lg[1][i] - lg[0][i]) <= logit_tol * lmx))
      fail_msg("logit %d: %.9g on %s, %.9g on the CPU (largest %.3g)", i, lg[1][i], be[1]->name, lg[0][i], lmx);
  for (size_t i = 0; i < g[0]->n_floats; i++)
    mx = fmax(mx, fabs(g[0]->arena[i]));
  for (size_t i = 0; i < g[0]->n_floats; i++) {
    const double d = fabs((double)g[1]->arena[i] - g[0]->arena[i]);
    if (!(d <= grad_tol * mx))
      fail_msg("gradient %zu: %.9g on %s, %.9g on the CPU (largest %.3g)", i, g[1]->arena[i], be[1]->name,
               g[0]->arena[i], mx);
    worst = fmax(worst, d);
  }
  fprintf(stderr, "    %s, %s weights: gradients within %.3g of the largest %.3g\n", be[1]->name, pa_lm_weights(lm[0]),
          worst, mx);
  for (int k = 0; k < 2; k++)
    pa_trainer_destroy(tr[k]), pa_lm_destroy(lm[k]);
  fixture_free(&f);
  *g_other = g[1], *g_cpu = g[0];
}

/* AdamW where the trainer runs (pa_trainer_optimise, then forward, backward
 * keeping the gradient, step) on backend `be` against the same steps taken
 * by hand there: the forward pass with the adapter's values, the gradient
 * written into a host adapter, and the CPU backend's adamw on host copies of
 * the moments. The device's adamw gives the CPU's bits (backend.h) and the
 * gradient is the same device's, so every step's logits and the adapter at
 * the end are the same bits; on a device the adapter's arena keeps its
 * starting values until pa_trainer_adapter_sync.
 * Bytes moved: the test double of tu_fake_device.h adds up every byte it
 * copies to and from its memory (tu_fake_uploaded, tu_fake_downloaded); the
 * test that runs on it passes those two totals as up and down, and moved[0]
 * and moved[1] receive the bytes the optimiser's three steps uploaded and
 * downloaded. The CPU and the GPU count nothing:
 * their callers give NULL for up, down and moved. */
static inline void tu_optimise_compare(const pa_backend *be, pa_weight_format wf, const size_t *up, const size_t *down,
                                       size_t moved[2]) {
  rng = 4343;
  fixture f;
  fixture_make(&f, PA_MK_QWEN2, "optimise.gguf");
  pa_lm *lm;
  pa_trainer *ta = NULL, *tb = NULL;
  const pa_train_plan plan = {.max_prefix = 21, .max_seqs = 3, .max_seq_len = 21, .max_out = 2, .rank = 4};
  if (pa_lm_create(f.m, &(pa_lm_opts){.n_threads = 2, .max_seq = 256, .backend = be, .weights = wf}, &lm) ||
      pa_trainer_create(lm, &plan, &ta) || pa_trainer_create(lm, &plan, &tb))
    fail_msg("%s backend: %s", be->name, pa_errmsg());
  pa_lora *wa, *wb, *g, *m, *v;
  assert_int_equal(pa_lora_create_like(f.lora, &wa), PA_OK);
  assert_int_equal(pa_lora_create_like(f.lora, &wb), PA_OK);
  assert_int_equal(pa_lora_create_like(f.lora, &g), PA_OK);
  assert_int_equal(pa_lora_create_like(f.lora, &m), PA_OK);
  assert_int_equal(pa_lora_create_like(f.lora, &v), PA_OK);
  const size_t bytes = f.lora->n_floats * sizeof(float);
  memcpy(wa->arena, f.lora->arena, bytes);
  memcpy(wb->arena, f.lora->arena, bytes);
  const pa_adamw_opts o = {.lr = 1e-2, .weight_decay = 0.1, .beta1 = 0.9, .beta2 = 0.999, .eps = 1e-8};
  if (pa_trainer_optimise(ta, wa, &o))
    fail_msg("%s backend: %s", be->name, pa_errmsg());
  float la[6], lb[6], first[6];
  size_t moved_up = 0, moved_down = 0;
  for (int k = 0; k < 3; k++) {
    const size_t up0 = up ? *up : 0, down0 = down ? *down : 0;
    if (pa_trainer_forward(ta, wa, &f.b, la) || pa_trainer_backward(ta, f.coef, NULL) || pa_trainer_step(ta))
      fail_msg("%s backend, step %d: %s", be->name, k + 1, pa_errmsg());
    if (up)
      moved_up += *up - up0, moved_down += *down - down0;
    if (pa_trainer_forward(tb, wb, &f.b, lb) || pa_trainer_backward(tb, f.coef, g))
      fail_msg("%s backend, step %d by hand: %s", be->name, k + 1, pa_errmsg());
    const pa_adamw_step st = pa_adamw_constants(&o, k + 1);
    pa_backend_cpu()->adamw(g->n_floats, &st, wb->arena, g->arena, m->arena, v->arena);
    assert_memory_equal(la, lb, sizeof la);
    if (k == 0)
      memcpy(first, la, sizeof first);
  }
  if (up)
    moved[0] = moved_up, moved[1] = moved_down;
  assert_int_equal(pa_trainer_steps(ta), 3);
  assert_true(memcmp(first, la, sizeof la) != 0); /* the steps moved the logits */
  if (!be->host_memory)                           /* the arena is stale until the download */
    assert_memory_equal(wa->arena, f.lora->arena, bytes);
  assert_int_equal(pa_trainer_adapter_sync(ta), PA_OK);
  assert_memory_equal(wa->arena, wb->arena, bytes);
  assert_true(memcmp(wa->arena, f.lora->arena, bytes) != 0);
  fprintf(stderr, "    %s, %s weights: 3 AdamW steps where the trainer runs, the same bits as by hand\n", be->name,
          pa_lm_weights(lm));
  pa_lora_destroy(wa), pa_lora_destroy(wb), pa_lora_destroy(g), pa_lora_destroy(m), pa_lora_destroy(v);
  pa_trainer_destroy(ta), pa_trainer_destroy(tb);
  pa_lm_destroy(lm);
  fixture_free(&f);
}

#endif
