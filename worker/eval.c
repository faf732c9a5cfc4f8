#include "eval.h"

#include "prompts.h"
#include "status.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define N_OPTIONS 5

enum { MEMO_SLOTS = 4 };

typedef struct {
  char *system;        /* NULL: the slot is empty */
  bool default_system; /* asked with system NULL (the template's default), not with "" */
  int *items;
  int n;
  long naive;         /* the remembered call's naive_tokens */
  unsigned long used; /* the evaluator's memo_clock when it was stored or last returned */
  pa_pred *preds;
  float *probs; /* NaN when the call did not ask for them */
} memo;

struct pa_evaluator {
  pa_lm *lm;
  const pa_tokenizer *tok;
  const pa_chat_template *tmpl;
  pa_eval_opts o;
  const char *prefix;
  int32_t letters[N_OPTIONS]; /* token ids of A..E after the prefix (logits mode) */
  int32_t stop[3];
  int n_stop;
  /* the shared prefix of the last call, reused when the next one matches */
  pa_kv *pkv;
  int32_t *pids;
  int pn;
  bool p_steered;      /* computed with steering or an adapter: never reused */
  const pa_lora *lora; /* pa_evaluator_set_lora */
  /* the answers of MEMO_SLOTS unsteered calls, returned again for the same
   * system prompt and items: `none` asks every subject the same, and PAS's
   * alpha 0 asks what `icl` and `none` asked just before. A new call takes
   * the place of the one least recently stored or returned, so `none`,
   * returned for every subject, stays while each subject's own prompts
   * (icl, p2) come and go. */
  memo memos[MEMO_SLOTS];
  unsigned long memo_clock;
  /* one cache per batch slot */
  pa_kv **slot;
  int slot_cap; /* tokens each slot holds */
  int n_slots;
};

static void memo_clear(memo *m) {
  free(m->system), free(m->items), free(m->preds), free(m->probs);
  memset(m, 0, sizeof *m);
}

static double now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* The token a letter becomes right after the prefix: the one token by which
 * "prefix + letter" extends "prefix". */
static int letter_tokens(pa_evaluator *ev) {
  int32_t *base = NULL, *ext = NULL;
  size_t nb, ne;
  const size_t plen = strlen(ev->prefix);
  int rc = pa_tokenizer_encode(ev->tok, ev->prefix, plen, 0, &base, &nb);
  for (int k = 0; !rc && k < N_OPTIONS; k++) {
    char text[256];
    snprintf(text, sizeof text, "%s%c", ev->prefix, 'A' + k);
    free(ext);
    ext = NULL;
    if ((rc = pa_tokenizer_encode(ev->tok, text, strlen(text), 0, &ext, &ne)))
      break;
    if (ne != nb + 1 || memcmp(base, ext, nb * sizeof *base) != 0)
      rc = pa_error(PA_EUNSUPPORTED,
                    "answers cannot be read from logits: after the prefix \"%s\" the letter %c is not one token of its "
                    "own for this tokenizer (use another --prefix or --mode generate)",
                    ev->prefix, 'A' + k);
    else
      ev->letters[k] = ext[ne - 1];
  }
  free(base);
  free(ext);
  return rc;
}

int pa_evaluator_create(pa_lm *lm, const pa_tokenizer *tok, const pa_chat_template *tmpl, const pa_eval_opts *o,
                        pa_evaluator **out) {
  *out = NULL;
  pa_evaluator *ev = calloc(1, sizeof *ev);
  if (!ev)
    return pa_error(PA_ENOMEM, "no memory");
  ev->lm = lm;
  ev->tok = tok;
  ev->tmpl = tmpl;
  ev->o = o ? *o : (pa_eval_opts){0};
  if (ev->o.batch <= 0)
    ev->o.batch = 64;
  if (ev->o.gen_tokens <= 0)
    ev->o.gen_tokens = 15;
  ev->prefix = ev->o.prefix ? ev->o.prefix : ev->o.mode == PA_READ_LOGITS ? "Option (" : "Option";
  const int32_t eot = pa_tokenizer_find(tok, pa_chat_template_end_of_turn(tmpl));
  const int32_t cand[3] = {eot, pa_tokenizer_eos(tok), pa_tokenizer_eot(tok)};
  for (int i = 0; i < 3; i++)
    if (cand[i] >= 0)
      ev->stop[ev->n_stop++] = cand[i];
  int rc = ev->o.mode == PA_READ_LOGITS ? letter_tokens(ev) : PA_OK;
  if (rc) {
    pa_evaluator_destroy(ev);
    return rc;
  }
  *out = ev;
  return PA_OK;
}

static void free_slots(pa_evaluator *ev) {
  for (int i = 0; i < ev->n_slots; i++)
    pa_kv_destroy(ev->slot[i]);
  free(ev->slot);
  ev->slot = NULL;
  ev->n_slots = 0;
  ev->slot_cap = 0;
}

void pa_evaluator_destroy(pa_evaluator *ev) {
  if (!ev)
    return;
  free_slots(ev);
  pa_kv_destroy(ev->pkv);
  free(ev->pids);
  for (int i = 0; i < MEMO_SLOTS; i++)
    memo_clear(&ev->memos[i]);
  free(ev);
}

/* Every forward pass of the evaluator, behind the caller's poll. */
static int forward(pa_evaluator *ev, const pa_batch *b) {
  if (ev->o.poll && ev->o.poll(ev->o.poll_ctx))
    return pa_error(PA_ECANCELED, "stopped on request");
  pa_batch polled = *b; /* and between its layers */
  polled.poll = ev->o.poll, polled.poll_ctx = ev->o.poll_ctx;
  return pa_lm_forward(ev->lm, &polled);
}

static memo *memo_find(pa_evaluator *ev, const char *system, const int *items, int n) {
  for (int i = 0; i < MEMO_SLOTS; i++) {
    memo *m = &ev->memos[i];
    if (m->system && n == m->n && m->default_system == !system && (!system || !strcmp(system, m->system)) &&
        !memcmp(items, m->items, (size_t)n * sizeof *items))
      return m;
  }
  return NULL;
}

/* Remembers an unsteered call's answers in the slot that holds the same
 * call (remembered without the probabilities asked for now), else in an
 * empty one, else in the one least recently used; on failure simply
 * remembers nothing. */
static void memo_store(pa_evaluator *ev, const char *system, const int *items, int n, const pa_pred *preds,
                       const float *probs, long naive) {
  memo *m = memo_find(ev, system, items, n);
  for (int i = 0; i < MEMO_SLOTS && !m; i++)
    if (!ev->memos[i].system)
      m = &ev->memos[i];
  if (!m) {
    m = &ev->memos[0];
    for (int i = 1; i < MEMO_SLOTS; i++)
      if (ev->memos[i].used < m->used)
        m = &ev->memos[i];
  }
  memo_clear(m);
  m->used = ++ev->memo_clock;
  m->system = strdup(system ? system : "");
  m->default_system = !system;
  m->items = malloc((size_t)n * sizeof *items);
  m->preds = malloc((size_t)n * sizeof *preds);
  m->probs = malloc((size_t)n * N_OPTIONS * sizeof *probs);
  if (!m->system || !m->items || !m->preds || !m->probs) {
    memo_clear(m);
    return;
  }
  memcpy(m->items, items, (size_t)n * sizeof *items);
  memcpy(m->preds, preds, (size_t)n * sizeof *preds);
  if (probs)
    memcpy(m->probs, probs, (size_t)n * N_OPTIONS * sizeof *probs);
  else
    for (int i = 0; i < n * N_OPTIONS; i++)
      m->probs[i] = NAN;
  m->n = n;
  m->naive = naive;
}

static int reserve_slots(pa_evaluator *ev, int n, int cap) {
  if (n <= ev->n_slots && cap <= ev->slot_cap)
    return PA_OK;
  if (cap < ev->slot_cap)
    cap = ev->slot_cap;
  if (n < ev->n_slots)
    n = ev->n_slots;
  free_slots(ev);
  ev->slot = calloc((size_t)n, sizeof *ev->slot);
  if (!ev->slot)
    return pa_error(PA_ENOMEM, "no memory");
  for (; ev->n_slots < n; ev->n_slots++) {
    int rc = pa_kv_create(ev->lm, cap, &ev->slot[ev->n_slots]);
    if (rc)
      return rc;
  }
  ev->slot_cap = cap;
  return PA_OK;
}

/* Computes (or reuses) the shared prefix cache for ids[0..n). */
static int shared_prefix(pa_evaluator *ev, const int32_t *ids, int n, const float *steer, long *computed) {
  *computed = 0;
  if (ev->pkv && !steer && !ev->lora && !ev->p_steered && n == ev->pn &&
      !memcmp(ids, ev->pids, (size_t)n * sizeof *ids))
    return PA_OK;
  if (!ev->pkv || pa_kv_capacity(ev->pkv) < n) {
    pa_kv_destroy(ev->pkv);
    ev->pkv = NULL;
    int rc = pa_kv_create(ev->lm, n, &ev->pkv);
    if (rc)
      return rc;
  }
  int32_t *copy = realloc(ev->pids, (size_t)n * sizeof *copy);
  if (!copy)
    return pa_error(PA_ENOMEM, "no memory");
  ev->pids = copy;
  memcpy(ev->pids, ids, (size_t)n * sizeof *ids);
  ev->pn = 0; /* invalid until computed */
  pa_kv_clear(ev->pkv);
  pa_seq seq = {.tokens = ids, .n_tokens = n, .kv = ev->pkv};
  int rc = forward(ev, &(pa_batch){.seqs = &seq, .n_seqs = 1, .steer = steer, .lora = ev->lora});
  if (rc)
    return rc;
  ev->pn = n;
  ev->p_steered = steer != NULL || ev->lora != NULL;
  *computed = n;
  return PA_OK;
}

int pa_parse_generated_answer(const char *text, size_t len) {
  /* walk at most 12 characters (UTF-8 code points, as Python slices) */
  int chars = 0;
  for (size_t i = 0; i < len && chars < 12; chars++) {
    const unsigned char c = (unsigned char)text[i];
    size_t w = c < 0x80 ? 1 : c >= 0xF0 ? 4 : c >= 0xE0 ? 3 : c >= 0xC0 ? 2 : 1;
    if (i + w > len)
      w = len - i;
    const bool letter_ae = (c >= 'a' && c <= 'e') || (c >= 'A' && c <= 'E');
    if (letter_ae && chars + 1 < 12 && i + 1 < len) {
      const unsigned char d = (unsigned char)text[i + 1];
      if (!((d >= 'a' && d <= 'z') || (d >= 'A' && d <= 'Z')))
        return 5 - ((c | 0x20) - 'a');
    }
    i += w;
  }
  return 0;
}

/* Logits mode: one forward of the batch, answers from the option letters
 * (the pass computes and returns only their logits). */
static int answer_logits(pa_evaluator *ev, pa_batch *b, const int *order, pa_pred *preds, float *probs) {
  static const int32_t each[N_OPTIONS] = {0, 1, 2, 3, 4}; /* the letters' places in a row of the restricted logits */
  float *logits = malloc((size_t)b->n_seqs * N_OPTIONS * sizeof *logits);
  if (!logits)
    return pa_error(PA_ENOMEM, "no memory for logits");
  b->logits = logits;
  b->logit_ids = ev->letters;
  b->n_logit_ids = N_OPTIONS;
  int rc = forward(ev, b);
  for (int s = 0; !rc && s < b->n_seqs; s++) {
    double p[N_OPTIONS];
    pa_softmax_subset(logits + (size_t)s * N_OPTIONS, each, N_OPTIONS, p);
    int best = 0;
    double expected = 0;
    bool numbers = true;
    for (int k = 0; k < N_OPTIONS; k++) {
      expected += p[k] * (5 - k);
      if (p[k] > p[best])
        best = k;
      numbers = numbers && p[k] >= 0; /* false for NaN */
      if (probs)
        probs[(size_t)order[s] * N_OPTIONS + k] = (float)p[k];
    }
    /* letter logits that are not numbers (a diverged adapter, an overflowing
     * steer) answer nothing: unknown, not the first letter */
    preds[order[s]].answer = numbers ? (uint8_t)(5 - best) : 0;
    preds[order[s]].expected = numbers ? (float)expected : NAN;
  }
  free(logits);
  return rc;
}

/* Generate mode: greedy decoding of the whole batch in lockstep. */
static int answer_generate(pa_evaluator *ev, pa_batch *b, const int *order, pa_pred *preds, long *generated) {
  const int V = pa_lm_config(ev->lm)->vocab_size, B = b->n_seqs, G = ev->o.gen_tokens;
  float *logits = malloc((size_t)B * V * sizeof *logits);
  int32_t *out = malloc((size_t)B * G * sizeof *out);
  int *len = calloc((size_t)B, sizeof *len), *live = malloc((size_t)B * sizeof *live);
  pa_seq *step = malloc((size_t)B * sizeof *step);
  int rc = logits && out && len && live && step ? PA_OK : pa_error(PA_ENOMEM, "no memory");
  int n_live = B;
  for (int s = 0; s < B; s++)
    live[s] = s;
  b->logits = logits;
  for (int t = 0; !rc && t < G && n_live > 0; t++) {
    if ((rc = forward(ev, b)))
      break;
    int kept = 0;
    for (int i = 0; i < n_live; i++) {
      const int s = live[i];
      const int32_t next = pa_argmax(logits + (size_t)i * V, V);
      bool stop = false;
      for (int k = 0; k < ev->n_stop; k++)
        stop |= next == ev->stop[k];
      if (stop)
        continue;
      out[(size_t)s * G + len[s]++] = next;
      if (t + 1 < G) {
        step[kept] = (pa_seq){.tokens = &out[(size_t)s * G + len[s] - 1], .n_tokens = 1, .kv = b->seqs[i].kv};
        live[kept++] = s;
      }
    }
    *generated += kept; /* each fed back as one more token */
    n_live = kept;
    memcpy(b->seqs, step, (size_t)kept * sizeof *step);
    b->n_seqs = kept;
  }
  for (int s = 0; !rc && s < B; s++) {
    char *text = NULL;
    size_t n = 0;
    if ((rc = pa_tokenizer_decode(ev->tok, out + (size_t)s * G, (size_t)len[s], 0, &text, &n)))
      break;
    preds[order[s]].answer = (uint8_t)pa_parse_generated_answer(text, n);
    preds[order[s]].expected = NAN;
    free(text);
  }
  free(logits), free(out), free(len), free(live), free(step);
  return rc;
}

static int prompt_ids(const pa_evaluator *ev, const pa_item *item, const char *system, int32_t **ids, size_t *n) {
  char *q = pa_prompt_question(item, !ev->o.keep_case);
  int rc = q ? pa_chat_tokenize(ev->tmpl, ev->tok, system, q, ev->prefix, ids, n) : pa_error(PA_ENOMEM, "no memory");
  free(q);
  return rc;
}

int pa_evaluator_prompt(const pa_evaluator *ev, const pa_inventory *inv, const char *system, int number, int32_t **ids,
                        size_t *n) {
  const pa_item *item = pa_inventory_item(inv, number);
  if (!item)
    return pa_error(PA_EINVAL, "item %d is not in the inventory", number);
  return prompt_ids(ev, item, system, ids, n);
}

pa_lm *pa_evaluator_lm(const pa_evaluator *ev) { return ev->lm; }
const pa_eval_opts *pa_evaluator_opts(const pa_evaluator *ev) { return &ev->o; }
const int32_t *pa_evaluator_letters(const pa_evaluator *ev) {
  return ev->o.mode == PA_READ_LOGITS ? ev->letters : NULL;
}
void pa_evaluator_set_lora(pa_evaluator *ev, const pa_lora *lora) { ev->lora = lora; }

int pa_evaluator_answer(pa_evaluator *ev, const pa_inventory *inv, const char *system, const int *items, int n,
                        const float *steer, pa_pred *preds, float *probs, pa_eval_stats *stats) {
  const double t0 = now();
  pa_eval_stats st = {0};
  memo *m = steer || ev->lora ? NULL : memo_find(ev, system, items, n);
  /* a remembered call that kept no probabilities answers one that asks for
   * them only in generate mode, which has none */
  if (m && (!probs || ev->o.mode == PA_READ_GENERATE || !isnan(m->probs[0]))) {
    m->used = ++ev->memo_clock;
    memcpy(preds, m->preds, (size_t)n * sizeof *preds);
    if (probs)
      memcpy(probs, m->probs, (size_t)n * N_OPTIONS * sizeof *probs);
    if (stats)
      *stats = (pa_eval_stats){.naive_tokens = m->naive, .prompts = n, .seconds = now() - t0};
    return PA_OK;
  }
  int32_t **ids = calloc((size_t)n, sizeof *ids);
  size_t *len = calloc((size_t)n, sizeof *len);
  int *order = malloc((size_t)n * sizeof *order);
  pa_seq *seqs = malloc((size_t)ev->o.batch * sizeof *seqs);
  int rc = ids && len && order && seqs ? PA_OK : pa_error(PA_ENOMEM, "no memory");
  for (int i = 0; !rc && i < n; i++) {
    const pa_item *item = pa_inventory_item(inv, items[i]);
    if (!item) {
      rc = pa_error(PA_EINVAL, "item %d is not in the inventory", items[i]);
      break;
    }
    rc = prompt_ids(ev, item, system, &ids[i], &len[i]);
    preds[i] = (pa_pred){.item = items[i], .expected = NAN};
  }
  /* the longest common token prefix, leaving every prompt at least one token */
  size_t common = 0, longest = 0;
  if (!rc && n > 0) {
    common = len[0];
    for (int i = 0; i < n; i++) {
      size_t k = 0;
      while (k < common && k < len[i] && ids[i][k] == ids[0][k])
        k++;
      common = k;
      longest = len[i] > longest ? len[i] : longest;
    }
    for (int i = 0; i < n; i++)
      if (common >= len[i])
        common = len[i] - 1;
    if (ev->o.no_share)
      common = 0;
    for (int i = 0; i < n; i++)
      st.naive_tokens += (long)len[i];
  }
  if (!rc && common > 0)
    rc = shared_prefix(ev, ids[0], (int)common, steer, &st.prefix_tokens);
  const int extra = ev->o.mode == PA_READ_GENERATE ? ev->o.gen_tokens : 0;
  if (!rc && n > 0)
    rc = reserve_slots(ev, n < ev->o.batch ? n : ev->o.batch, (int)(longest - common) + extra);
  if (probs && ev->o.mode == PA_READ_GENERATE) /* generated text has no option probabilities */
    for (size_t i = 0; i < (size_t)n * N_OPTIONS; i++)
      probs[i] = NAN;
  for (int start = 0; !rc && start < n; start += ev->o.batch) {
    const int B = n - start < ev->o.batch ? n - start : ev->o.batch;
    for (int s = 0; s < B; s++) {
      const int i = start + s;
      pa_kv_clear(ev->slot[s]);
      seqs[s] = (pa_seq){.tokens = ids[i] + common, .n_tokens = (int)(len[i] - common), .kv = ev->slot[s]};
      order[s] = i;
      st.question_tokens += (long)(len[i] - common);
    }
    pa_batch b = {.prefix = common > 0 ? ev->pkv : NULL, .seqs = seqs, .n_seqs = B, .steer = steer, .lora = ev->lora};
    rc = ev->o.mode == PA_READ_LOGITS ? answer_logits(ev, &b, order, preds, probs)
                                      : answer_generate(ev, &b, order, preds, &st.question_tokens);
  }
  for (int i = 0; ids && i < n; i++)
    free(ids[i]);
  free(ids), free(len), free(order), free(seqs);
  if (!rc && !steer && !ev->lora && n > 0)
    memo_store(ev, system, items, n, preds, probs, st.naive_tokens);
  st.prompts = n;
  st.seconds = now() - t0;
  if (stats)
    *stats = st;
  return rc;
}
