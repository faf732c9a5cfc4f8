#include "probe.h"

#include "rng.h"
#include "status.h"

#include <cblas.h>
#include <float.h>
#include <math.h>
#include <omp.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- the split ---------------------------------------------------------- */

/* Uniform in [0, bound): plain `r % bound` would favour small values by up to
 * bound / 2^64; rejecting the lowest 2^64 mod bound draws removes that, at an
 * expected cost far below one extra draw. */
static uint64_t splitmix_below(uint64_t *s, uint64_t bound) {
  uint64_t threshold = (0 - bound) % bound; /* 2^64 mod bound */
  for (;;) {
    uint64_t r = pa_splitmix64(s);
    if (r >= threshold)
      return r % bound;
  }
}


uint64_t pa_pas_split_seed(uint64_t run_seed, const char *subject_id) { return pa_mix64(run_seed ^ pa_fnv1a64(subject_id)); }

void pa_pas_shuffle(uint64_t seed, int n, int *perm) {
  uint64_t s = seed;
  for (int i = 0; i < n; i++)
    perm[i] = i;
  for (int i = n - 1; i > 0; i--) {
    int j = (int)splitmix_below(&s, (uint64_t)i + 1);
    int t = perm[i];
    perm[i] = perm[j];
    perm[j] = t;
  }
}

/* Integer arithmetic: 0.4 * n in floating point is never above the integer
 * ceil for the n that occur, but this needs no argument. */
int pa_pas_n_val(int n) { return n > 0 ? (2 * n + 4) / 5 : 0; }

int pa_pas_bank_items(const pa_inventory *inv, int *items, int cap) {
  int n_train, k = 0;
  const int *train = pa_inventory_train(inv, &n_train);
  if (cap < n_train)
    return pa_error(PA_EINVAL, "the activation bank has %d items; room was given for %d", n_train, cap);
  for (int t = 0; t < PA_N_TRAITS; t++)
    for (int i = 0; i < n_train; i++)
      if (pa_inventory_item(inv, train[i])->trait == (pa_trait)t)
        items[k++] = train[i];
  return k;
}

const char *pa_pas_status_str(pa_pas_status s) {
  switch (s) {
  case PA_PAS_FITTED: return "fitted";
  case PA_PAS_NO_SAMPLES: return "no samples";
  case PA_PAS_ONE_CLASS: return "one class";
  }
  return "unknown status";
}

/* ---- one logistic regression ------------------------------------------- */

/* log(1 + e^t) without overflow or loss of the small tail. */
static double softplus(double t) { return t > 0 ? t + log1p(exp(-t)) : log1p(exp(t)); }

static double sigmoid(double t) {
  if (t >= 0)
    return 1 / (1 + exp(-t));
  double e = exp(t);
  return e / (1 + e);
}

/* The objective at theta = (w, b): returns f, fills the margins m_i = w.x_i + b
 * and the gradient g. Sums run over the samples in order, so the result does
 * not depend on anything but the inputs. acc is [d] scratch. */
static double objective(const double *X, const uint8_t *y, int n, int d, double C, const double *theta, double *m,
                        double *g, double *acc) {
  const double *w = theta;
  double b = theta[d], loss = 0, rb = 0;
  memset(acc, 0, (size_t)d * sizeof *acc);
  for (int i = 0; i < n; i++) {
    const double *x = X + (size_t)i * d;
    double mi = b;
    for (int k = 0; k < d; k++)
      mi += x[k] * w[k];
    m[i] = mi;
    /* label 1: loss log(1 + e^-m), d/dm = -sigmoid(-m); label 0: log(1 + e^m), sigmoid(m) */
    double r = y[i] ? -sigmoid(-mi) : sigmoid(mi);
    loss += y[i] ? softplus(-mi) : softplus(mi);
    for (int k = 0; k < d; k++)
      acc[k] += r * x[k];
    rb += r;
  }
  double ww = 0;
  for (int k = 0; k < d; k++) {
    ww += w[k] * w[k];
    g[k] = w[k] + C * acc[k];
  }
  g[d] = C * rb;
  return 0.5 * ww + C * loss;
}

static double max_abs(const double *v, int n) {
  double a = 0;
  for (int i = 0; i < n; i++)
    a = fmax(a, fabs(v[i]));
  return a;
}

static double sum_abs(const double *v, int n) {
  double a = 0;
  for (int i = 0; i < n; i++)
    a += fabs(v[i]);
  return a;
}

/* LAPACK's Cholesky factorisation, as OpenBLAS provides it (its own code,
 * no Fortran string lengths; Debian's OpenBLAS has 32-bit integers, as
 * declared here). Column-major; palign's matrices are row-major, whose lower
 * triangle is the column-major upper one. */
void dpotrf_(const char *uplo, const int *n, double *a, const int *lda, int *info);

/* In-place Cholesky of the lower triangle of the row-major p x p matrix A
 * (L with L L^T = A, in that triangle); false if A is not positive definite
 * or not finite (then A is garbage): dpotrf reports a pivot that is not
 * positive, but a NaN or infinite one passes it, so the factor's diagonal
 * is checked too. */
static bool cholesky(double *A, int p) {
  int info = 0;
  dpotrf_("U", &p, A, &p, &info);
  for (int j = 0; j < p && info == 0; j++)
    if (!(A[(size_t)j * p + j] > 0) || !isfinite(A[(size_t)j * p + j]))
      info = j + 1;
  return info == 0;
}

/* Solves L L^T x = v in place. */
static void cholesky_solve(const double *L, int p, double *v) {
  for (int i = 0; i < p; i++) {
    double t = v[i];
    for (int k = 0; k < i; k++)
      t -= L[(size_t)i * p + k] * v[k];
    v[i] = t / L[(size_t)i * p + i];
  }
  for (int i = p - 1; i >= 0; i--) {
    double t = v[i];
    for (int k = i + 1; k < p; k++)
      t -= L[(size_t)k * p + i] * v[k];
    v[i] = t / L[(size_t)i * p + i];
  }
}

/* C D_i, a sample's curvature in the Hessian: D = sigmoid(m) sigmoid(-m). */
static double curvature(double C, double m) {
  const double e = exp(-fabs(m));
  return C * e / ((1 + e) * (1 + e));
}

/* The Hessian's lower triangle: [I + C X^T D X, C X^T D 1; ., C 1^T D 1] with
 * D = sigmoid(m) sigmoid(-m). The d x d block is one product, OpenBLAS's
 * dsyrk of the samples scaled by sqrt(C D) (xs, [n][d] scratch; dw [n]). */
static void hessian(const double *X, int n, int d, double C, const double *m, double *H, double *dw, double *xs) {
  const int p = d + 1;
  double *last = H + (size_t)d * p;
  memset(last, 0, (size_t)p * sizeof *last);
  for (int i = 0; i < n; i++) {
    dw[i] = curvature(C, m[i]);
    const double r = sqrt(dw[i]);
    const double *x = X + (size_t)i * d;
    for (int c = 0; c < d; c++)
      xs[(size_t)i * d + c] = r * x[c];
  }
  cblas_dsyrk(CblasRowMajor, CblasLower, CblasTrans, d, n, 1.0, xs, d, 0.0, H, p);
  for (int i = 0; i < n; i++) {
    const double *x = X + (size_t)i * d;
    for (int c = 0; c < d; c++)
      last[c] += dw[i] * x[c];
    last[d] += dw[i];
  }
  for (int a = 0; a < d; a++)
    H[(size_t)a * p + a] += 1; /* the L2 term; the intercept has none */
}

/* The Newton step -H^{-1} g through the samples' n x n system rather than
 * H's (d+1) x (d+1) one, for fewer samples than dimensions (a probe of a
 * 128-dim head of an 8B model fits about 110). With S = diag(sqrt(C D)),
 * t = S 1, X_S = S X and M = I + X_S X_S^T = I + S G S (G = X X^T, made once
 * a solve: X does not change), the block I + X^T C D X has the inverse
 * I - X_S^T M^{-1} X_S (Woodbury), and the intercept's row is eliminated by
 * its Schur complement, which comes out as t^T M^{-1} t. For r = -g: with
 * a = M^{-1} t and e = M^{-1} X_S r_w, the step is b = (r_b - t^T e) / (t^T a)
 * and w = r_w - X_S^T (e + b a). That last difference makes a w step that may
 * be smaller than its terms by up to the largest eigenvalue of X^T C D X, and
 * loses that many times the rounding: so this way is taken only while the
 * trace of X_S X_S^T (at least that eigenvalue) is at most kDualMaxTrace,
 * the step then right to about 1e-10 of its size; false sends the caller H's
 * way (newton_primal) otherwise (activations far above 1), and where t^T a
 * is not positive (D has underflowed: H's way has its ridge for that). M's
 * eigenvalues are at least 1, so its factorisation does not fail. t, a, e: [n]. */
enum { kDualMaxTrace = 1000000 };

static bool newton_dual(const double *X, int n, int d, double C, const double *m, const double *G, const double *g,
                        double *step, double *M, double *t, double *a, double *e) {
  for (int i = 0; i < n; i++)
    t[i] = sqrt(curvature(C, m[i]));
  double trace = 0; /* of X_S X_S^T: at least its largest eigenvalue */
  for (int i = 0; i < n; i++) {
    for (int j = 0; j < i; j++)
      M[(size_t)i * n + j] = t[i] * G[(size_t)i * n + j] * t[j];
    trace += t[i] * G[(size_t)i * n + i] * t[i];
    M[(size_t)i * n + i] = 1 + t[i] * G[(size_t)i * n + i] * t[i];
  }
  if (!(trace <= kDualMaxTrace) || !cholesky(M, n))
    return false;
  cblas_dgemv(CblasRowMajor, CblasNoTrans, n, d, -1.0, X, d, g, 1, 0.0, e, 1); /* X r_w */
  for (int i = 0; i < n; i++) {
    e[i] *= t[i];
    a[i] = t[i];
  }
  cholesky_solve(M, n, a);
  cholesky_solve(M, n, e);
  double den = 0, te = 0;
  for (int i = 0; i < n; i++) {
    den += t[i] * a[i];
    te += t[i] * e[i];
  }
  const double b = (-g[d] - te) / den;
  if (!(den > 0) || !isfinite(b))
    return false;
  for (int i = 0; i < n; i++)
    e[i] = t[i] * (e[i] + b * a[i]);
  for (int k = 0; k < d; k++)
    step[k] = -g[k];
  cblas_dgemv(CblasRowMajor, CblasTrans, n, d, -1.0, X, d, e, 1, 1.0, step, 1);
  step[d] = b;
  return true;
}

/* The Newton step -H^{-1} g through H itself. H is positive definite in
 * exact arithmetic (the L2 term, and both classes present make the
 * intercept's curvature positive), but sigmoid(m)sigmoid(-m) underflows for
 * margins beyond ~700: then a small ridge keeps the step defined, and where
 * even that fails the step is -g. H [p][p], dw [n], xs [n][d]: scratch. */
static void newton_primal(const double *X, int n, int d, double C, const double *m, const double *g, double *step,
                          double *H, double *dw, double *xs) {
  const int p = d + 1;
  hessian(X, n, d, C, m, H, dw, xs);
  bool ok = cholesky(H, p);
  for (double ridge = 1e-12; !ok && ridge <= 1; ridge *= 100) {
    hessian(X, n, d, C, m, H, dw, xs);
    for (int a = 0; a < p; a++)
      H[(size_t)a * p + a] += ridge * (1 + H[(size_t)a * p + a]);
    ok = cholesky(H, p);
  }
  for (int a = 0; a < p; a++)
    step[a] = -g[a];
  if (ok)
    cholesky_solve(H, p, step); /* else steepest descent */
}

/* Backtracking (Armijo) from wb along step, for f and g at wb. Near the
 * optimum f changes by less than its rounding error; there, as in sklearn's
 * newton-cholesky, a step is taken if f does not rise beyond rounding and the
 * gradient shrinks. True with the point taken in cand, its objective in *fc,
 * its margins in mc and its gradient in gc; false when no step lowers f. */
static bool line_search(const double *X, const uint8_t *y, int n, int d, double C, const double *wb, double f,
                        const double *g, const double *step, double *cand, double *mc, double *gc, double *acc,
                        double *fc) {
  const int p = d + 1;
  double slope = 0;
  for (int a = 0; a < p; a++)
    slope += g[a] * step[a];
  const double g1 = sum_abs(g, p);
  double t = 1;
  for (int k = 0; k < 60; k++, t *= 0.5) {
    for (int a = 0; a < p; a++)
      cand[a] = wb[a] + t * step[a];
    *fc = objective(X, y, n, d, C, cand, mc, gc, acc);
    if (!isfinite(*fc))
      continue;
    if (*fc <= f + 1e-4 * t * slope)
      return true;
    if (*fc - f <= 16 * DBL_EPSILON * fabs(f) && sum_abs(gc, p) < g1)
      return true;
  }
  return false;
}

/* PALIGN_PROBE_NEWTON: unset, empty or "auto" (each step the cheaper way),
 * or "hessian" (every step through H, newton_primal: to compare the two). */
static int newton_way(bool *hessian_only) {
  const char *way = getenv("PALIGN_PROBE_NEWTON");
  *hessian_only = way && !strcmp(way, "hessian");
  if (way && *way && strcmp(way, "auto") && !*hessian_only)
    return pa_error(PA_EINVAL, "PALIGN_PROBE_NEWTON is '%s': expected auto or hessian", way);
  return PA_OK;
}

size_t pa_pas_logreg_scratch(int n, int d) {
  const size_t p = (size_t)d + 1, N = (size_t)n;
  return p * p + 4 * p                      /* H; g, step, cand, gc */
         + 3 * N + d                        /* m, mc, dw; acc */
         + N * d                            /* xs: the scaled samples */
         + (n < d ? 2 * N * N + 3 * N : 0); /* G, M; t, a, e: newton_dual, for fewer samples than dimensions */
}

int pa_pas_logreg(const double *X, const uint8_t *y, int n, int d, double C, int max_iter, double *wb,
                  pa_pas_probe *info, double *scratch) {
  if (n < 2 || d < 1 || !(C > 0) || !isfinite(C) || max_iter < 1)
    return pa_error(PA_EINVAL, "logistic regression: n = %d samples, d = %d, C = %g, max_iter = %d", n, d, C, max_iter);
  int n1 = 0;
  for (int i = 0; i < n; i++)
    n1 += y[i] != 0;
  if (n1 == 0 || n1 == n)
    return pa_error(PA_EINVAL, "logistic regression: all %d samples have label %d; the intercept is unbounded", n,
                    n1 ? 1 : 0);
  bool hessian_only;
  int rc = newton_way(&hessian_only);
  if (rc)
    return rc;
  double *own = NULL;
  if (!scratch) {
    own = scratch = malloc(pa_pas_logreg_scratch(n, d) * sizeof *scratch);
    if (!own)
      return pa_error(PA_ENOMEM, "logistic regression: no memory for %d x %d", n, d);
  }
  int p = d + 1;
  double *H = scratch, *g = H + (size_t)p * p, *step = g + p, *cand = step + p, *gc = cand + p, *m = gc + p,
         *mc = m + n, *acc = mc + n, *dw = acc + d, *xs = dw + n;
  /* fewer samples than dimensions: the steps through the samples' system (newton_dual) */
  const bool dual = n < d && !hessian_only;
  double *G = NULL, *M = NULL, *ts = NULL, *ta = NULL, *te = NULL;
  if (n < d) {
    G = xs + (size_t)n * d;
    M = G + (size_t)n * n;
    ts = M + (size_t)n * n;
    ta = ts + n;
    te = ta + n;
  }
  if (dual)
    cblas_dsyrk(CblasRowMajor, CblasLower, CblasNoTrans, n, d, 1.0, X, d, 0.0, G, n);

  /* Convergence is judged against the gradient's natural size, C sum_i |x_i|_inf
   * (what a residual of one on every sample would give): rounding alone leaves
   * a gradient of about 1e-16 to 1e-14 of that. */
  double gscale = 0;
  for (size_t i = 0; i < (size_t)n * d; i += d)
    gscale += max_abs(X + i, d);
  gscale = fmax(1, C * gscale);
  double gtol = 1e-10 * gscale;

  memset(wb, 0, (size_t)p * sizeof *wb);
  double f = objective(X, y, n, d, C, wb, m, g, acc);
  int it = 0, dual_steps = 0;
  bool converged = false;
  for (;;) {
    /* Below the threshold one more Newton step is taken: convergence is
     * quadratic, so it brings the gradient from <= 1e-10 of its scale down to
     * rounding level, and the coefficients to ~1e-13, at the cost of one step. */
    if (converged || max_abs(g, p) <= gtol) {
      if (converged)
        break;
      converged = true;
    }
    if (it == max_iter)
      break;
    if (dual && newton_dual(X, n, d, C, m, G, g, step, M, ts, ta, te))
      dual_steps++;
    else
      newton_primal(X, n, d, C, m, g, step, H, dw, xs);
    double fc = 0;
    const bool accepted = line_search(X, y, n, d, C, wb, f, g, step, cand, mc, gc, acc, &fc);
    it++;
    if (!accepted)
      break; /* no decrease is possible any more: the gradient is at its rounding floor */
    memcpy(wb, cand, (size_t)p * sizeof *wb);
    memcpy(g, gc, (size_t)p * sizeof *g);
    memcpy(m, mc, (size_t)n * sizeof *m);
    f = fc;
  }
  if (info) {
    info->iterations = it;
    info->dual_steps = dual_steps;
    info->grad_max = max_abs(g, p);
    info->converged = converged;
  }
  free(own);
  return PA_OK;
}

/* ---- a subject ---------------------------------------------------------- */

/* realloc that keeps p on failure and returns from the calling function. */
#define RESIZE(p, n)                                                                                                   \
  do {                                                                                                                 \
    void *q_ = realloc((p), (size_t)(n) * sizeof *(p));                                                                \
    if (!q_)                                                                                                           \
      return pa_error(PA_ENOMEM, "PAS fit: no memory for %ld elements of %s", (long)(n), #p);                          \
    (p) = q_;                                                                                                          \
  } while (0)

/* Buffers for this shape; those a previous fit left that are big enough stay. */
static int reserve(pa_pas_fit *f, int n_seqs, int n_lh, int d, int K) {
  if (n_seqs > f->cap_samples) {
    RESIZE(f->sample_seq, n_seqs);
    RESIZE(f->sample_label, n_seqs);
    RESIZE(f->sample_val, n_seqs);
    f->cap_samples = n_seqs;
  }
  if (n_lh > f->cap_probes) {
    RESIZE(f->probes, n_lh);
    f->cap_probes = n_lh;
  }
  if (n_lh * (d + 1) > f->cap_coef) {
    RESIZE(f->coef, n_lh * (d + 1));
    f->cap_coef = n_lh * (d + 1);
  }
  if (K > f->cap_heads) {
    RESIZE(f->heads, K);
    f->cap_heads = K;
  }
  if (K * d > f->cap_dirs) {
    RESIZE(f->dir_block, K * d);
    f->cap_dirs = K * d;
  }
  return PA_OK;
}

void pa_pas_fit_free(pa_pas_fit *f) {
  if (!f)
    return;
  free(f->sample_seq);
  free(f->sample_label);
  free(f->sample_val);
  free(f->probes);
  free(f->coef);
  free(f->dir_block);
  free(f->heads);
  memset(f, 0, sizeof *f);
}

static const float *zrow(const pa_pas_bank *b, int seq, int l, int h) {
  return b->z + (((size_t)seq * b->n_layers + l) * b->n_heads + h) * b->head_dim;
}

/* X [n][d] (double) of head (l, h): the training samples first, then the
 * validation ones, each part in ascending sample order; y alike. */
static void gather(const pa_pas_bank *b, const pa_pas_fit *f, int l, int h, double *X, uint8_t *y) {
  int d = b->head_dim, r = 0;
  for (int part = 0; part < 2; part++)
    for (int s = 0; s < f->n_samples; s++) {
      if (f->sample_val[s] != part)
        continue;
      const float *z = zrow(b, f->sample_seq[s], l, h);
      for (int k = 0; k < d; k++)
        X[(size_t)r * d + k] = z[k];
      y[r++] = f->sample_label[s];
    }
}

/* The unit direction of step 5 and sigma; false if the class means are equal.
 * The means are taken of x_i - x_0, which changes nothing in exact arithmetic;
 * but a head whose activation is the same in every sample then sums exact
 * zeros, where sums of the raw values would round differently for the two
 * classes' counts and leave a spurious direction of size 1e-17. */
static bool direction(const double *X, const uint8_t *y, int n, int d, double *u, double *sigma, double *tmp) {
  int n1 = 0;
  memset(u, 0, (size_t)d * sizeof *u);
  memset(tmp, 0, (size_t)d * sizeof *tmp);
  for (int i = 0; i < n; i++) {
    double *acc = y[i] ? u : tmp;
    n1 += y[i] != 0;
    for (int k = 0; k < d; k++)
      acc[k] += X[(size_t)i * d + k] - X[k];
  }
  double nrm = 0;
  for (int k = 0; k < d; k++) {
    u[k] = u[k] / n1 - tmp[k] / (n - n1);
    nrm += u[k] * u[k];
  }
  nrm = sqrt(nrm);
  if (!(nrm > 0))
    return false;
  for (int k = 0; k < d; k++)
    u[k] /= nrm;
  /* Two passes (the projections are cheap to recompute): accurate when the
   * spread is small against the mean. */
  double mean = 0, ss = 0;
  for (int i = 0; i < n; i++) {
    double pr = 0;
    for (int k = 0; k < d; k++)
      pr += X[(size_t)i * d + k] * u[k];
    mean += pr;
  }
  mean /= n;
  for (int i = 0; i < n; i++) {
    double pr = 0;
    for (int k = 0; k < d; k++)
      pr += X[(size_t)i * d + k] * u[k];
    ss += (pr - mean) * (pr - mean);
  }
  *sigma = sqrt(ss / n);
  return true;
}

typedef struct {
  long key; /* train_correct * n_val + val_correct * n_train = 2 n_train n_val score, exactly */
  int layer, head;
} rank_entry;

static int rank_cmp(const void *pa, const void *pb) {
  const rank_entry *a = pa, *b = pb;
  if (a->key != b->key)
    return a->key > b->key ? -1 : 1;
  if (a->layer != b->layer)
    return a->layer < b->layer ? -1 : 1;
  return (a->head > b->head) - (a->head < b->head);
}

static int check_args(const pa_pas_bank *b, const uint8_t *answers, const char *id, const pa_pas_opts *o,
                      pa_pas_fit *out) {
  if (!b || !b->z || !answers || !id || !out)
    return pa_error(PA_EINVAL, "PAS fit: a required argument is NULL");
  if (b->n_items < 1 || b->n_layers < 1 || b->n_heads < 1 || b->head_dim < 1 || b->n_items > (1 << 20) ||
      (long)b->n_layers * b->n_heads > (1 << 20) || b->head_dim > (1 << 16))
    return pa_error(PA_EINVAL, "PAS fit: bank shape %d items x %d layers x %d heads x %d dims is not usable",
                    b->n_items, b->n_layers, b->n_heads, b->head_dim);
  for (int i = 0; i < b->n_items; i++)
    if (answers[i] > 5)
      return pa_error(PA_EINVAL, "PAS fit, subject %s: answer %d to bank item %d is outside 0..5", id, answers[i], i);
  if (o && (o->top_k < 0 || o->max_iter < 0 || o->n_threads < 0 || o->C < 0 || !isfinite(o->C)))
    return pa_error(PA_EINVAL, "PAS fit: options top_k %d, C %g, max_iter %d, n_threads %d are not usable", o->top_k,
                    o->C, o->max_iter, o->n_threads);
  bool hessian_only;
  return newton_way(&hessian_only); /* checked here, before the heads' solves would each fail on it */
}

int pa_pas_fit_subject(const pa_pas_bank *bank, const uint8_t *answers, const char *subject_id, const pa_pas_opts *opts,
                       pa_pas_fit *out) {
  int rc = check_args(bank, answers, subject_id, opts, out);
  if (rc)
    return rc;
  double t0 = omp_get_wtime();
  pa_pas_opts o = opts ? *opts : (pa_pas_opts){0};
  int K = o.top_k ? o.top_k : PA_PAS_TOP_K, max_iter = o.max_iter ? o.max_iter : PA_PAS_MAX_ITER;
  double C = o.C > 0 ? o.C : 1.0;
  int L = bank->n_layers, Hn = bank->n_heads, d = bank->head_dim, n_lh = L * Hn, n_seqs = 2 * bank->n_items;
  if (K > n_lh)
    K = n_lh;

  if ((long)n_lh * (d + 1) > INT32_MAX || (long)K * d > INT32_MAX)
    return pa_error(PA_EINVAL, "PAS fit: %d heads x %d dims is too large", n_lh, d);
  if ((rc = reserve(out, n_seqs, n_lh, d, K)))
    return rc;
  float *dirs = out->dir_block;

  out->n_layers = L, out->n_heads = Hn, out->head_dim = d;
  out->n_selected = 0;
  out->message[0] = '\0';
  memset(out->probes, 0, (size_t)n_lh * sizeof *out->probes);
  memset(out->coef, 0, (size_t)n_lh * (d + 1) * sizeof *out->coef);

  /* step 2: labels */
  int n = 0;
  for (int i = 0; i < bank->n_items; i++) {
    int v = answers[i];
    if (v == 0 || v == 3)
      continue;
    uint8_t a = v > 3;
    out->sample_seq[n] = 2 * i, out->sample_label[n++] = a;
    out->sample_seq[n] = 2 * i + 1, out->sample_label[n++] = !a;
  }
  out->n_samples = n;

  /* step 3: the split */
  out->split_seed = pa_pas_split_seed(o.run_seed, subject_id);
  out->n_val = pa_pas_n_val(n);
  out->n_train = n - out->n_val;
  int *perm = malloc((size_t)(n > 0 ? n : 1) * sizeof *perm);
  if (!perm)
    return pa_error(PA_ENOMEM, "PAS fit: no memory for %d samples", n);
  pa_pas_shuffle(out->split_seed, n, perm);
  memset(out->sample_val, 0, (size_t)n_seqs);
  for (int k = 0; k < out->n_val; k++)
    out->sample_val[perm[k]] = 1;
  free(perm);

  int train1 = 0;
  for (int s = 0; s < n; s++)
    train1 += !out->sample_val[s] && out->sample_label[s];
  if (n == 0) {
    out->status = PA_PAS_NO_SAMPLES;
    snprintf(out->message, sizeof out->message,
             "subject %.40s: every answer to the %d bank items is 0 (missing) or 3 (neutral): nothing to label",
             subject_id, bank->n_items);
    out->seconds = omp_get_wtime() - t0;
    return PA_OK;
  }
  if (train1 == 0 || train1 == out->n_train) {
    out->status = PA_PAS_ONE_CLASS;
    snprintf(out->message, sizeof out->message,
             "subject %.40s: the %d training samples (of %d labelled) all have label %d: the probes' intercept "
             "is unbounded",
             subject_id, out->n_train, n, train1 ? 1 : 0);
    out->seconds = omp_get_wtime() - t0;
    return PA_OK;
  }

  /* Non-finite activations would make every number after them NaN. */
  for (int s = 0; s < n; s++) {
    const float *z = bank->z + (size_t)out->sample_seq[s] * n_lh * d;
    for (size_t k = 0; k < (size_t)n_lh * d; k++)
      if (!isfinite(z[k])) {
        size_t lh = k / (size_t)d;
        return pa_error(PA_EINVAL, "PAS fit: bank sequence %d, layer %zu, head %zu, dim %zu holds %g",
                        out->sample_seq[s], lh / (size_t)Hn, lh % (size_t)Hn, k % (size_t)d, (double)z[k]);
      }
  }

  /* step 3: every head's probe, one head per thread at a time. OpenBLAS
   * (the Hessian's product and its factorisation) runs on the calling thread,
   * as everywhere in palign: the threads are ours, and a product split by
   * OpenBLAS's thread count could change the results' last bits with it. */
  int nt = out->n_train, nv = out->n_val, failed = 0;
  int n_threads = o.n_threads > 0 ? o.n_threads : omp_get_max_threads();
  openblas_set_num_threads(1);
#pragma omp parallel num_threads(n_threads) reduction(| : failed)
  {
    double *X = malloc((size_t)n * d * sizeof *X);
    uint8_t *y = malloc((size_t)n);
    double *scr = malloc(pa_pas_logreg_scratch(nt, d) * sizeof *scr);
    if (!X || !y || !scr)
      failed = 1;
#pragma omp for schedule(dynamic, 1)
    for (int lh = 0; lh < n_lh; lh++) {
      if (failed)
        continue;
      pa_pas_probe *pr = &out->probes[lh];
      double *wb = out->coef + (size_t)lh * (d + 1);
      gather(bank, out, lh / Hn, lh % Hn, X, y);
      if (pa_pas_logreg(X, y, nt, d, C, max_iter, wb, pr, scr) != PA_OK) {
        failed = 1; /* cannot happen: the arguments were checked above */
        continue;
      }
      for (int r = 0; r < n; r++) {
        double m = wb[d];
        for (int k = 0; k < d; k++)
          m += X[(size_t)r * d + k] * wb[k];
        int right = (m > 0) == (y[r] != 0); /* sklearn's predict: class 1 iff w.x + b > 0 */
        if (r < nt)
          pr->train_correct += right;
        else
          pr->val_correct += right;
      }
      pr->train_acc = (double)pr->train_correct / nt;
      pr->val_acc = (double)pr->val_correct / nv;
      pr->score = (pr->train_acc + pr->val_acc) / 2;
    }
    free(X);
    free(y);
    free(scr);
  }
  if (failed)
    return pa_error(PA_ENOMEM, "PAS fit: no memory for the probes' scratch (%d samples x %d dims)", n, d);

  /* step 4: rank; step 5: directions, skipping heads whose direction is zero */
  rank_entry *rank = malloc((size_t)n_lh * sizeof *rank);
  double *X = malloc((size_t)n * d * sizeof *X), *u = malloc((size_t)d * sizeof *u),
         *tmp = malloc((size_t)d * sizeof *tmp);
  uint8_t *y = malloc((size_t)n);
  if (!rank || !X || !u || !tmp || !y) {
    free(rank), free(X), free(u), free(tmp), free(y);
    return pa_error(PA_ENOMEM, "PAS fit: no memory to rank %d heads", n_lh);
  }
  for (int lh = 0; lh < n_lh; lh++)
    rank[lh] = (rank_entry){(long)out->probes[lh].train_correct * nv + (long)out->probes[lh].val_correct * nt, lh / Hn,
                            lh % Hn};
  qsort(rank, (size_t)n_lh, sizeof *rank, rank_cmp); /* a total order: no two entries compare equal */
  int zero_dirs = 0;
  for (int r = 0; r < n_lh && out->n_selected < K; r++) {
    double sigma;
    gather(bank, out, rank[r].layer, rank[r].head, X, y);
    if (!direction(X, y, n, d, u, &sigma, tmp)) {
      zero_dirs++;
      continue;
    }
    pa_pas_head *hd = &out->heads[out->n_selected];
    const pa_pas_probe *pr = &out->probes[rank[r].layer * Hn + rank[r].head];
    hd->layer = rank[r].layer, hd->head = rank[r].head;
    hd->score = pr->score, hd->train_acc = pr->train_acc, hd->val_acc = pr->val_acc;
    hd->direction = dirs + (size_t)out->n_selected * d;
    for (int k = 0; k < d; k++)
      hd->direction[k] = (float)u[k];
    hd->sigma = sigma;
    out->n_selected++;
  }
  free(rank), free(X), free(u), free(tmp), free(y);

  out->status = PA_PAS_FITTED;
  out->seconds = omp_get_wtime() - t0;
  if (out->n_selected)
    snprintf(out->message, sizeof out->message,
             "subject %.32s: %d probes, %d samples (%d train, %d validation); %d heads (best: layer %d "
             "head %d, score %.4f)%s",
             subject_id, n_lh, n, nt, nv, out->n_selected, out->heads[0].layer, out->heads[0].head, out->heads[0].score,
             zero_dirs ? "; zero directions skipped" : "");
  else
    snprintf(out->message, sizeof out->message,
             "subject %.40s: %d probes on %d samples; no head has a non-zero direction", subject_id, n_lh, n);
  return PA_OK;
}

int pa_pas_steering(const pa_pas_fit *f, double alpha, int n_layers, int n_heads, int head_dim, float *delta) {
  if (!f || !delta || n_layers < 1 || n_heads < 1 || head_dim < 1)
    return pa_error(PA_EINVAL, "PAS steering: a required argument is NULL or a size is not positive");
  if (f->n_selected > 0 && (f->n_layers != n_layers || f->n_heads != n_heads || f->head_dim != head_dim))
    return pa_error(PA_EINVAL, "PAS steering: the fit is for %d x %d heads of %d, the model has %d x %d of %d",
                    f->n_layers, f->n_heads, f->head_dim, n_layers, n_heads, head_dim);
  if (!isfinite(alpha))
    return pa_error(PA_EINVAL, "PAS steering: alpha %g is not finite", alpha);
  memset(delta, 0, (size_t)n_layers * n_heads * head_dim * sizeof *delta);
  for (int i = 0; i < f->n_selected; i++) {
    const pa_pas_head *h = &f->heads[i];
    float *dst = delta + ((size_t)h->layer * n_heads + h->head) * head_dim;
    for (int k = 0; k < head_dim; k++)
      dst[k] += (float)(alpha * h->sigma * h->direction[k]);
  }
  return PA_OK;
}
