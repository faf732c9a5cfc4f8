#include "model.h"

#include "chat.h"
#include "gguf.h"
#include "hfdir.h"
#include "quant.h"
#include "status.h"
#include "tokenizer.h"

#include <cJSON.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#define PA_PI 3.14159265358979323846

struct pa_model {
  char *path;
  pa_model_config cfg;
  pa_gguf *gguf; /* exactly one of gguf and hf is set */
  pa_hfdir *hf;
  pa_tokenizer *tok;
  pa_chat_template *chat; /* NULL when the model names no template palign knows */
  char **tensor_names;    /* NUL-terminated copies, for pa_tensor_info */
  size_t n_tensors;
};

/* A stored tensor, whichever file it lives in. Shape is outermost first. */
typedef struct {
  const char *name;
  uint32_t type;
  const char *type_name;
  uint32_t n_dims;
  uint64_t shape[4];
  const void *data;
} src_tensor;

/* ---- description ------------------------------------------------------- */

int pa_model_config_validate(const pa_model_config *c, const char *src) {
#define RANGE(field, lo, hi)                                                                                           \
  if (c->field < (lo) || c->field > (hi))                                                                              \
    return pa_error(PA_EFORMAT, "%s: %s = %lld is outside %lld..%lld", src, #field, (long long)c->field,               \
                    (long long)(lo), (long long)(hi));
  RANGE(n_layers, 1, 1024);
  RANGE(dim, 1, 1 << 16);
  RANGE(n_heads, 1, 1024);
  RANGE(n_kv_heads, 1, 1024);
  RANGE(head_dim, 2, 1024);
  RANGE(ffn_dim, 1, 1 << 20);
  RANGE(vocab_size, 1, 1 << 22);
  RANGE(max_seq, 1, 1 << 24);
#undef RANGE
  if (c->n_heads % c->n_kv_heads != 0)
    return pa_error(PA_EFORMAT, "%s: %d query heads are not a multiple of %d key/value heads", src, c->n_heads,
                    c->n_kv_heads);
  if (c->head_dim % 2 != 0)
    return pa_error(PA_EFORMAT, "%s: head dimension %d is odd; RoPE needs pairs", src, c->head_dim);
  if (!(c->rope_theta >= 1) || !isfinite(c->rope_theta)) /* below 1 the frequencies grow, to infinity near 0 */
    return pa_error(PA_EFORMAT, "%s: RoPE base %g is not a number of at least 1", src, (double)c->rope_theta);
  if (!(c->norm_eps > 0 && c->norm_eps < 1))
    return pa_error(PA_EFORMAT, "%s: RMSNorm epsilon %g is outside (0, 1)", src, (double)c->norm_eps);
  if (c->rope_scaling.kind == PA_ROPE_SCALING_LLAMA3 && c->rope_scaling.factor != 0) {
    if (!(c->rope_scaling.factor >= 1) || !(c->rope_scaling.low_freq_factor > 0) ||
        !(c->rope_scaling.high_freq_factor > c->rope_scaling.low_freq_factor) || c->rope_scaling.orig_max_seq < 1)
      return pa_error(PA_EFORMAT,
                      "%s: inconsistent llama3 rope_scaling (factor %g, low %g, high %g, original context %d)", src,
                      (double)c->rope_scaling.factor, (double)c->rope_scaling.low_freq_factor,
                      (double)c->rope_scaling.high_freq_factor, c->rope_scaling.orig_max_seq);
  }
  return PA_OK;
}

static bool arch_known(const char *arch) {
  return !strcmp(arch, "llama") || !strcmp(arch, "mistral") || !strcmp(arch, "qwen2");
}

/* llama.cpp's converter interleaves the Q/K rows of the architectures its
 * adjacent-pair RoPE runs (llama, mistral); qwen2 keeps rotate-half order. */
static bool gguf_qk_interleaved(const char *arch) { return strcmp(arch, "qwen2") != 0; }

static int gguf_int(const pa_gguf *g, const char *arch, const char *key, bool required, int64_t dflt, int32_t *out) {
  char full[128];
  int64_t v;
  snprintf(full, sizeof full, "%s.%s", arch, key);
  int rc = pa_gguf_get_int(g, full, 0, INT32_MAX, &v);
  if (rc == PA_ENOTFOUND && !required)
    v = dflt, rc = PA_OK;
  if (!rc)
    *out = (int32_t)v;
  return rc;
}

static int gguf_float(const pa_gguf *g, const char *arch, const char *key, double dflt, float *out) {
  char full[128];
  double v;
  snprintf(full, sizeof full, "%s.%s", arch, key);
  int rc = pa_gguf_get_float(g, full, &v);
  if (rc == PA_ENOTFOUND)
    v = dflt, rc = PA_OK;
  if (!rc)
    *out = (float)v;
  return rc;
}

static void copy_str(char *dst, size_t cap, pa_str s) {
  size_t n = s.len < cap - 1 ? (size_t)s.len : cap - 1;
  memcpy(dst, s.ptr, n);
  dst[n] = '\0';
}

static int config_from_gguf(const pa_gguf *g, pa_model_config *c) {
  const char *path = pa_gguf_path(g);
  pa_str s;
  int rc = pa_gguf_get_str(g, "general.architecture", &s);
  if (rc)
    return rc;
  copy_str(c->arch, sizeof c->arch, s);
  if (!arch_known(c->arch))
    return pa_error(PA_EUNSUPPORTED,
                    "%s: architecture '%s' is not a Llama-family model palign supports (llama, mistral, qwen2)", path,
                    c->arch);
  c->qkv_bias = !strcmp(c->arch, "qwen2");
  if (!pa_gguf_get_str(g, "general.name", &s))
    copy_str(c->name, sizeof c->name, s);
  const char *a = c->arch;
  if ((rc = gguf_int(g, a, "block_count", true, 0, &c->n_layers)) ||
      (rc = gguf_int(g, a, "embedding_length", true, 0, &c->dim)) ||
      (rc = gguf_int(g, a, "feed_forward_length", true, 0, &c->ffn_dim)) ||
      (rc = gguf_int(g, a, "attention.head_count", true, 0, &c->n_heads)) ||
      (rc = gguf_int(g, a, "attention.head_count_kv", false, c->n_heads, &c->n_kv_heads)) ||
      (rc = gguf_int(g, a, "context_length", false, 4096, &c->max_seq)) ||
      (rc = gguf_float(g, a, "rope.freq_base", 10000.0, &c->rope_theta)) ||
      (rc = gguf_float(g, a, "attention.layer_norm_rms_epsilon", 1e-5, &c->norm_eps)))
    return rc;
  if (c->n_heads < 1)
    return pa_error(PA_EFORMAT, "%s: %s.attention.head_count is 0", path, a);
  if ((rc = gguf_int(g, a, "attention.key_length", false, c->dim / c->n_heads, &c->head_dim)))
    return rc;
  int32_t rot;
  if ((rc = gguf_int(g, a, "rope.dimension_count", false, c->head_dim, &rot)))
    return rc;
  if (rot != c->head_dim)
    return pa_error(PA_EUNSUPPORTED, "%s: partial rotary embedding (%d of %d dimensions) is not supported", path, rot,
                    c->head_dim);

  /* the vocabulary size: metadata if present, else the embedding's row count */
  const pa_gguf_tensor *emb = pa_gguf_find_tensor(g, "token_embd.weight");
  if (!emb)
    return pa_error(PA_ENOTFOUND, "%s: tensor 'token_embd.weight' is missing", path);
  if ((rc = gguf_int(g, a, "vocab_size", false, (int64_t)(emb->n_dims == 2 && emb->ne[1] <= INT32_MAX ? emb->ne[1] : 0),
                     &c->vocab_size)))
    return rc;
  c->tied_embeddings = pa_gguf_find_tensor(g, "output.weight") == NULL;

  /* Llama-3.1 scaling reaches GGUF as a tensor of frequency divisors */
  const bool has_freqs = pa_gguf_find_tensor(g, "rope_freqs.weight") != NULL;
  if (has_freqs) {
    c->rope_scaling.kind = PA_ROPE_SCALING_LLAMA3;
    if ((rc = gguf_float(g, a, "rope.scaling.factor", 0, &c->rope_scaling.factor)) ||
        (rc = gguf_int(g, a, "rope.scaling.original_context_length", false, 0, &c->rope_scaling.orig_max_seq)))
      return rc;
  }
  char key[128];
  pa_str scaling;
  snprintf(key, sizeof key, "%s.rope.scaling.type", a);
  if (!has_freqs && !pa_gguf_get_str(g, key, &scaling) && !pa_str_eq(scaling, "none"))
    return pa_error(PA_EUNSUPPORTED, "%s: RoPE scaling '%.*s' is not supported (only Llama-3.1 style)", path,
                    (int)(scaling.len > 40 ? 40 : scaling.len), scaling.ptr);
  pa_error_clear();
  return pa_model_config_validate(c, path);
}

/* config.json numbers: required ones must be present and integral. */
static int json_int(const cJSON *cfg, const char *path, const char *key, bool required, int64_t dflt, int32_t *out) {
  const cJSON *v = cJSON_GetObjectItemCaseSensitive(cfg, key);
  if (!v || cJSON_IsNull(v)) {
    if (required)
      return pa_error(PA_EFORMAT, "%s: config.json has no '%s'", path, key);
    *out = (int32_t)dflt;
    return PA_OK;
  }
  if (!cJSON_IsNumber(v) || v->valuedouble != floor(v->valuedouble) || v->valuedouble < 0 || v->valuedouble > INT32_MAX)
    return pa_error(PA_EFORMAT, "%s: config.json '%s' must be a non-negative integer", path, key);
  *out = (int32_t)v->valuedouble;
  return PA_OK;
}

static int json_float(const cJSON *cfg, const char *path, const char *key, double dflt, float *out) {
  const cJSON *v = cJSON_GetObjectItemCaseSensitive(cfg, key);
  if (!v || cJSON_IsNull(v)) {
    *out = (float)dflt;
    return PA_OK;
  }
  if (!cJSON_IsNumber(v))
    return pa_error(PA_EFORMAT, "%s: config.json '%s' must be a number", path, key);
  *out = (float)v->valuedouble;
  return PA_OK;
}

static int config_from_hf(const pa_hfdir *h, pa_model_config *c) {
  const cJSON *cfg = pa_hfdir_config(h);
  const char *path = pa_hfdir_path(h);
  const cJSON *mt = cJSON_GetObjectItemCaseSensitive(cfg, "model_type");
  if (!cJSON_IsString(mt))
    return pa_error(PA_EFORMAT, "%s: config.json has no 'model_type' string", path);
  snprintf(c->arch, sizeof c->arch, "%s", mt->valuestring);
  if (!arch_known(c->arch))
    return pa_error(
        PA_EUNSUPPORTED,
        "%s: config.json model_type '%s' is not a Llama-family model palign supports (llama, mistral, qwen2)", path,
        c->arch);
  /* Qwen2 always has Q/K/V biases; Llama's optional biases (attention_bias
   * adds one to W_o as well, mlp_bias to the MLP) and Qwen2's sliding-window
   * attention are not implemented: refused rather than silently ignored. */
  c->qkv_bias = !strcmp(c->arch, "qwen2");
  static const char *const unsupported_flags[] = {"attention_bias", "mlp_bias", "use_sliding_window"};
  for (size_t i = 0; i < sizeof unsupported_flags / sizeof unsupported_flags[0]; i++) {
    const cJSON *f = cJSON_GetObjectItemCaseSensitive(cfg, unsupported_flags[i]);
    if (f && !cJSON_IsBool(f) && !cJSON_IsNull(f))
      return pa_error(PA_EFORMAT, "%s: config.json '%s' must be true or false", path, unsupported_flags[i]);
    if (cJSON_IsTrue(f))
      return pa_error(PA_EUNSUPPORTED, "%s: config.json sets '%s', which palign does not support", path,
                      unsupported_flags[i]);
  }
  const cJSON *nm = cJSON_GetObjectItemCaseSensitive(cfg, "_name_or_path");
  if (cJSON_IsString(nm))
    snprintf(c->name, sizeof c->name, "%s", nm->valuestring);
  int rc;
  if ((rc = json_int(cfg, path, "num_hidden_layers", true, 0, &c->n_layers)) ||
      (rc = json_int(cfg, path, "hidden_size", true, 0, &c->dim)) ||
      (rc = json_int(cfg, path, "intermediate_size", true, 0, &c->ffn_dim)) ||
      (rc = json_int(cfg, path, "num_attention_heads", true, 0, &c->n_heads)) ||
      (rc = json_int(cfg, path, "num_key_value_heads", false, c->n_heads, &c->n_kv_heads)) ||
      (rc = json_int(cfg, path, "vocab_size", true, 0, &c->vocab_size)) ||
      (rc = json_int(cfg, path, "max_position_embeddings", false, 4096, &c->max_seq)) ||
      (rc = json_float(cfg, path, "rope_theta", 10000.0, &c->rope_theta)) ||
      (rc = json_float(cfg, path, "rms_norm_eps", 1e-6, &c->norm_eps)))
    return rc;
  if (c->n_heads < 1)
    return pa_error(PA_EFORMAT, "%s: config.json num_attention_heads is 0", path);
  if ((rc = json_int(cfg, path, "head_dim", false, c->dim / c->n_heads, &c->head_dim)))
    return rc;
  const cJSON *tie = cJSON_GetObjectItemCaseSensitive(cfg, "tie_word_embeddings");
  if (tie && !cJSON_IsBool(tie))
    return pa_error(PA_EFORMAT, "%s: config.json 'tie_word_embeddings' must be true or false", path);
  c->tied_embeddings = tie ? cJSON_IsTrue(tie) : false;

  const cJSON *rs = cJSON_GetObjectItemCaseSensitive(cfg, "rope_scaling");
  if (rs && !cJSON_IsNull(rs)) {
    const cJSON *ty = cJSON_GetObjectItemCaseSensitive(rs, "rope_type");
    if (!ty)
      ty = cJSON_GetObjectItemCaseSensitive(rs, "type");
    if (!cJSON_IsString(ty))
      return pa_error(PA_EFORMAT, "%s: config.json rope_scaling has no rope_type", path);
    if (strcmp(ty->valuestring, "default") != 0) {
      if (strcmp(ty->valuestring, "llama3") != 0)
        return pa_error(PA_EUNSUPPORTED, "%s: rope_scaling type '%s' is not supported (only llama3)", path,
                        ty->valuestring);
      c->rope_scaling.kind = PA_ROPE_SCALING_LLAMA3;
      if ((rc = json_float(rs, path, "factor", 8.0, &c->rope_scaling.factor)) ||
          (rc = json_float(rs, path, "low_freq_factor", 1.0, &c->rope_scaling.low_freq_factor)) ||
          (rc = json_float(rs, path, "high_freq_factor", 4.0, &c->rope_scaling.high_freq_factor)) ||
          (rc = json_int(rs, path, "original_max_position_embeddings", false, 8192, &c->rope_scaling.orig_max_seq)))
        return rc;
      if (!(c->rope_scaling.factor >= 1)) /* 0 means "divisors from the file" in GGUF only */
        return pa_error(PA_EFORMAT, "%s: config.json rope_scaling factor %g is below 1", path,
                        (double)c->rope_scaling.factor);
    }
  }
  return pa_model_config_validate(c, path);
}

/* ---- tensors ---------------------------------------------------------------- */

static int find_src(const pa_model *m, const char *gguf_name, const char *hf_name, src_tensor *out) {
  if (m->gguf) {
    const pa_gguf_tensor *t = pa_gguf_find_tensor(m->gguf, gguf_name);
    if (!t)
      return pa_error(PA_ENOTFOUND, "%s: tensor '%s' is missing", m->path, gguf_name);
    out->name = gguf_name;
    out->type = t->type;
    out->type_name = pa_dtype_name(t->type);
    out->n_dims = t->n_dims;
    for (uint32_t d = 0; d < t->n_dims; d++)
      out->shape[d] = t->ne[t->n_dims - 1 - d];
    out->data = t->data;
    return PA_OK;
  }
  const pa_st_tensor *t = pa_hfdir_find_tensor(m->hf, hf_name);
  if (!t)
    return pa_error(PA_ENOTFOUND, "%s: tensor '%s' is missing", m->path, hf_name);
  if (t->n_dims > 4)
    return pa_error(PA_EFORMAT, "%s: tensor '%s' has %u dimensions", m->path, hf_name, t->n_dims);
  out->name = hf_name;
  out->type = t->dtype;
  out->type_name = t->dtype_name;
  out->n_dims = t->n_dims;
  for (uint32_t d = 0; d < t->n_dims; d++)
    out->shape[d] = t->shape[d];
  out->data = t->data;
  return PA_OK;
}

/* Every weight the model may need, in arena order. */
typedef struct {
  const char *gguf, *hf; /* names; "%d" is the layer */
  int rows, cols;        /* expected shape; cols 0 for a vector */
  int permute_heads;     /* GGUF interleaved RoPE rows -> rotate-half, with this many heads */
  size_t offset;         /* into the layer's struct */
  bool qkv_bias;         /* present only in models with Q/K/V biases */
} weight_spec;

enum { N_LAYER_WEIGHTS = 12 };

static bool spec_used(const pa_model_config *c, const weight_spec *s) { return !s->qkv_bias || c->qkv_bias; }

static void layer_specs(const pa_model_config *c, weight_spec s[N_LAYER_WEIGHTS]) {
  const int q = c->n_heads * c->head_dim, kv = c->n_kv_heads * c->head_dim;
  const weight_spec specs[N_LAYER_WEIGHTS] = {
      {"blk.%d.attn_norm.weight", "model.layers.%d.input_layernorm.weight", c->dim, 0, 0,
       offsetof(pa_layer_weights, attn_norm), false},
      {"blk.%d.attn_q.weight", "model.layers.%d.self_attn.q_proj.weight", q, c->dim, c->n_heads,
       offsetof(pa_layer_weights, wq), false},
      {"blk.%d.attn_k.weight", "model.layers.%d.self_attn.k_proj.weight", kv, c->dim, c->n_kv_heads,
       offsetof(pa_layer_weights, wk), false},
      {"blk.%d.attn_v.weight", "model.layers.%d.self_attn.v_proj.weight", kv, c->dim, 0, offsetof(pa_layer_weights, wv),
       false},
      {"blk.%d.attn_output.weight", "model.layers.%d.self_attn.o_proj.weight", c->dim, q, 0,
       offsetof(pa_layer_weights, wo), false},
      {"blk.%d.ffn_norm.weight", "model.layers.%d.post_attention_layernorm.weight", c->dim, 0, 0,
       offsetof(pa_layer_weights, ffn_norm), false},
      {"blk.%d.ffn_gate.weight", "model.layers.%d.mlp.gate_proj.weight", c->ffn_dim, c->dim, 0,
       offsetof(pa_layer_weights, w_gate), false},
      {"blk.%d.ffn_up.weight", "model.layers.%d.mlp.up_proj.weight", c->ffn_dim, c->dim, 0,
       offsetof(pa_layer_weights, w_up), false},
      {"blk.%d.ffn_down.weight", "model.layers.%d.mlp.down_proj.weight", c->dim, c->ffn_dim, 0,
       offsetof(pa_layer_weights, w_down), false},
      {"blk.%d.attn_q.bias", "model.layers.%d.self_attn.q_proj.bias", q, 0, c->n_heads, offsetof(pa_layer_weights, bq),
       true},
      {"blk.%d.attn_k.bias", "model.layers.%d.self_attn.k_proj.bias", kv, 0, c->n_kv_heads,
       offsetof(pa_layer_weights, bk), true},
      {"blk.%d.attn_v.bias", "model.layers.%d.self_attn.v_proj.bias", kv, 0, 0, offsetof(pa_layer_weights, bv), true},
  };
  memcpy(s, specs, sizeof specs);
}

static size_t spec_floats(const weight_spec *s) { return (size_t)s->rows * (size_t)(s->cols ? s->cols : 1); }

static int check_shape(const pa_model *m, const src_tensor *t, int rows, int cols) {
  bool ok = cols ? (t->n_dims == 2 && t->shape[0] == (uint64_t)rows && t->shape[1] == (uint64_t)cols)
                 : (t->n_dims == 1 && t->shape[0] == (uint64_t)rows);
  if (ok)
    return PA_OK;
  char got[96] = "", want[48];
  for (uint32_t d = 0; d < t->n_dims; d++) {
    size_t n = strlen(got);
    snprintf(got + n, sizeof got - n, "%s%llu", d ? ", " : "", (unsigned long long)t->shape[d]);
  }
  if (cols)
    snprintf(want, sizeof want, "%d, %d", rows, cols);
  else
    snprintf(want, sizeof want, "%d", rows);
  return pa_error(PA_EFORMAT, "%s: tensor '%s' has shape [%s], the description needs [%s]", m->path, t->name, got,
                  want);
}

/* Dequantises one tensor into dst, undoing GGUF's interleaved Q/K row order. */
static int read_weight(const pa_model *m, const src_tensor *t, int rows, int cols, int permute_heads, float *dst,
                       float *scratch) {
  int rc = check_shape(m, t, rows, cols);
  if (rc)
    return rc;
  if (!pa_dtype_can_dequantize(t->type))
    return pa_error(PA_EUNSUPPORTED, "%s: tensor '%s' has type %s, which palign cannot dequantise", m->path, t->name,
                    t->type_name);
  const uint64_t n = (uint64_t)rows * (uint64_t)(cols ? cols : 1);
  const bool permute = m->gguf && permute_heads && gguf_qk_interleaved(m->cfg.arch);
  if ((rc = pa_dequantize(t->type, t->data, permute ? scratch : dst, n)))
    return pa_error_prefix(rc, "%s: tensor '%s': ", m->path, t->name);
  if (!permute)
    return PA_OK;
  /* GGUF row 2b+a of a head holds Hugging Face row a*(hd/2)+b (llama.cpp's convert permutation) */
  const int hd = rows / permute_heads, half = hd / 2;
  const size_t width = (size_t)(cols ? cols : 1); /* a bias permutes like its matrix's rows */
  for (int h = 0; h < permute_heads; h++)
    for (int a = 0; a < 2; a++)
      for (int b = 0; b < half; b++)
        memcpy(dst + ((size_t)h * hd + a * half + b) * width, scratch + ((size_t)h * hd + 2 * b + a) * width,
               width * sizeof(float));
  return PA_OK;
}

/* Llama-3.1 RoPE scaling as divisors of the base frequencies. */
static void llama3_freq_div(const pa_model_config *c, float *div) {
  const double lo_wavelen = c->rope_scaling.orig_max_seq / c->rope_scaling.low_freq_factor;
  const double hi_wavelen = c->rope_scaling.orig_max_seq / c->rope_scaling.high_freq_factor;
  for (int i = 0; i < c->head_dim / 2; i++) {
    const double freq = pow(c->rope_theta, -2.0 * i / c->head_dim);
    const double wavelen = 2 * PA_PI / freq;
    if (wavelen < hi_wavelen) {
      div[i] = 1.0f;
    } else if (wavelen > lo_wavelen) {
      div[i] = c->rope_scaling.factor;
    } else {
      const double smooth = (c->rope_scaling.orig_max_seq / wavelen - c->rope_scaling.low_freq_factor) /
                            (c->rope_scaling.high_freq_factor - c->rope_scaling.low_freq_factor);
      div[i] = (float)(1.0 / ((1 - smooth) / c->rope_scaling.factor + smooth));
    }
  }
}

int pa_model_load_weights(const pa_model *m, pa_weights *w) {
  memset(w, 0, sizeof *w);
  const pa_model_config *c = &m->cfg;
  weight_spec specs[N_LAYER_WEIGHTS];
  layer_specs(c, specs);
  size_t per_layer = 0, largest = (size_t)c->vocab_size * c->dim;
  for (int i = 0; i < N_LAYER_WEIGHTS; i++) {
    if (!spec_used(c, &specs[i]))
      continue;
    per_layer += spec_floats(&specs[i]);
    if (spec_floats(&specs[i]) > largest)
      largest = spec_floats(&specs[i]);
  }
  const bool scaled = c->rope_scaling.kind != PA_ROPE_SCALING_NONE;
  w->n_floats = (size_t)c->vocab_size * c->dim * (c->tied_embeddings ? 1 : 2) + c->dim + per_layer * c->n_layers +
                (scaled ? (size_t)c->head_dim / 2 : 0);
  w->arena = malloc(w->n_floats * sizeof(float));
  w->layers = calloc((size_t)c->n_layers, sizeof *w->layers);
  float *scratch = m->gguf ? malloc(largest * sizeof(float)) : NULL;
  if (!w->arena || !w->layers || (m->gguf && !scratch)) {
    free(scratch);
    pa_weights_free(w);
    return pa_error(PA_ENOMEM, "%s: no memory for %zu MB of fp32 weights", m->path, w->n_floats * 4 >> 20);
  }
  float *p = w->arena;
  src_tensor t;
  int rc;
#define TAKE(dst, gname, hname, rows, cols)                                                                            \
  do {                                                                                                                 \
    if ((rc = find_src(m, gname, hname, &t)) || (rc = read_weight(m, &t, rows, cols, 0, p, scratch)))                  \
      goto fail;                                                                                                       \
    dst = p;                                                                                                           \
    p += (size_t)(rows) * (size_t)((cols) ? (cols) : 1);                                                               \
  } while (0)
  TAKE(w->tok_embd, "token_embd.weight", "model.embed_tokens.weight", c->vocab_size, c->dim);
  TAKE(w->out_norm, "output_norm.weight", "model.norm.weight", c->dim, 0);
  if (c->tied_embeddings)
    w->output = w->tok_embd;
  else
    TAKE(w->output, "output.weight", "lm_head.weight", c->vocab_size, c->dim);
#undef TAKE
  for (int l = 0; l < c->n_layers; l++) {
    for (int i = 0; i < N_LAYER_WEIGHTS; i++) {
      if (!spec_used(c, &specs[i]))
        continue;
      char gname[96], hname[96];
      snprintf(gname, sizeof gname, specs[i].gguf, l);
      snprintf(hname, sizeof hname, specs[i].hf, l);
      if ((rc = find_src(m, gname, hname, &t)) ||
          (rc = read_weight(m, &t, specs[i].rows, specs[i].cols, specs[i].permute_heads, p, scratch)))
        goto fail;
      *(float **)((char *)&w->layers[l] + specs[i].offset) = p;
      p += spec_floats(&specs[i]);
    }
  }
  if (scaled) {
    w->rope_freq_div = p;
    if (m->gguf) {
      if ((rc = find_src(m, "rope_freqs.weight", NULL, &t)) ||
          (rc = read_weight(m, &t, c->head_dim / 2, 0, 0, p, scratch)))
        goto fail;
      for (int i = 0; i < c->head_dim / 2; i++)
        if (!(p[i] > 0) || !isfinite(p[i]) || !isfinite(1.0f / p[i])) { /* RoPE divides by them */
          rc = pa_error(PA_EFORMAT, "%s: rope_freqs.weight[%d] = %g is not a positive divisor", m->path, i,
                        (double)p[i]);
          goto fail;
        }
    } else {
      llama3_freq_div(c, p);
    }
    p += c->head_dim / 2;
  }
  free(scratch);
  return PA_OK;
fail:
  free(scratch);
  pa_weights_free(w);
  return rc;
}

void pa_weights_free(pa_weights *w) {
  if (!w)
    return;
  free(w->arena);
  free(w->layers);
  memset(w, 0, sizeof *w);
}

/* ---- opening ------------------------------------------------------------------ */

static int collect_tensor_names(pa_model *m) {
  m->n_tensors = m->gguf ? pa_gguf_n_tensors(m->gguf) : pa_hfdir_n_tensors(m->hf);
  m->tensor_names = calloc(m->n_tensors ? m->n_tensors : 1, sizeof *m->tensor_names);
  if (!m->tensor_names)
    return pa_error(PA_ENOMEM, "%s: no memory", m->path);
  for (size_t i = 0; i < m->n_tensors; i++) {
    if (m->gguf) {
      pa_str s = pa_gguf_tensor_at(m->gguf, i)->name;
      m->tensor_names[i] = strndup(s.ptr, (size_t)s.len);
    } else {
      m->tensor_names[i] = strdup(pa_hfdir_tensor_at(m->hf, i)->name);
    }
    if (!m->tensor_names[i])
      return pa_error(PA_ENOMEM, "%s: no memory", m->path);
  }
  return PA_OK;
}

/* Every tensor the description implies must be present with its shape now, so
 * that a broken file fails at open, not minutes later. */
static int check_tensors(const pa_model *m) {
  const pa_model_config *c = &m->cfg;
  src_tensor t;
  int rc;
  if ((rc = find_src(m, "token_embd.weight", "model.embed_tokens.weight", &t)) ||
      (rc = check_shape(m, &t, c->vocab_size, c->dim)) ||
      (rc = find_src(m, "output_norm.weight", "model.norm.weight", &t)) || (rc = check_shape(m, &t, c->dim, 0)))
    return rc;
  if (!c->tied_embeddings &&
      ((rc = find_src(m, "output.weight", "lm_head.weight", &t)) || (rc = check_shape(m, &t, c->vocab_size, c->dim))))
    return rc;
  weight_spec specs[N_LAYER_WEIGHTS];
  layer_specs(c, specs);
  for (int l = 0; l < c->n_layers; l++)
    for (int i = 0; i < N_LAYER_WEIGHTS; i++) {
      if (!spec_used(c, &specs[i]))
        continue;
      char gname[96], hname[96];
      snprintf(gname, sizeof gname, specs[i].gguf, l);
      snprintf(hname, sizeof hname, specs[i].hf, l);
      if ((rc = find_src(m, gname, hname, &t)) || (rc = check_shape(m, &t, specs[i].rows, specs[i].cols)))
        return rc;
      if (!pa_dtype_can_dequantize(t.type))
        return pa_error(PA_EUNSUPPORTED, "%s: tensor '%s' has type %s, which palign cannot dequantise", m->path, t.name,
                        t.type_name);
    }
  if (m->gguf && c->rope_scaling.kind == PA_ROPE_SCALING_LLAMA3 &&
      ((rc = find_src(m, "rope_freqs.weight", NULL, &t)) || (rc = check_shape(m, &t, c->head_dim / 2, 0))))
    return rc;
  return PA_OK;
}

static int open_tokenizer(pa_model *m) {
  int rc;
  const char *jinja = NULL;
  if (m->gguf) {
    if ((rc = pa_tokenizer_from_gguf(m->gguf, &m->tok)))
      return rc;
    const pa_gguf_kv *kv = pa_gguf_find(m->gguf, "tokenizer.chat_template");
    char *tmpl = NULL;
    if (kv && kv->type == PA_GGUF_STRING && !(tmpl = strndup(kv->strs[0].ptr, (size_t)kv->strs[0].len)))
      return pa_error(PA_ENOMEM, "%s: no memory", m->path);
    rc = pa_chat_template_from_jinja(tmpl, m->cfg.arch, &m->chat);
    free(tmpl);
  } else {
    if ((rc = pa_tokenizer_from_json(pa_hfdir_tokenizer_json_path(m->hf), pa_hfdir_tokenizer_config_path(m->hf),
                                     &m->tok)))
      return rc;
    jinja = pa_hfdir_chat_template(m->hf);
    rc = pa_chat_template_from_jinja(jinja, m->cfg.arch, &m->chat);
  }
  /* a model without a recognisable chat template is still usable with --template */
  if (rc) {
    m->chat = NULL;
    pa_error_clear();
  }
  int n_vocab = pa_tokenizer_n_vocab(m->tok);
  if (n_vocab > m->cfg.vocab_size)
    return pa_error(PA_EFORMAT, "%s: the tokenizer has %d tokens but the embedding only %d rows", m->path, n_vocab,
                    m->cfg.vocab_size);
  return PA_OK;
}

int pa_model_open(const char *path, pa_model **out) {
  *out = NULL;
  pa_model *m = calloc(1, sizeof *m);
  if (!m || !(m->path = strdup(path))) {
    free(m);
    return pa_error(PA_ENOMEM, "%s: no memory", path);
  }
  struct stat st;
  int rc;
  if (stat(path, &st) != 0)
    rc = pa_error(PA_ENOTFOUND, "%s: no such file or directory", path);
  else if (S_ISDIR(st.st_mode))
    rc = pa_hfdir_open(path, &m->hf);
  else
    rc = pa_gguf_open(path, &m->gguf);
  if (!rc)
    rc = m->gguf ? config_from_gguf(m->gguf, &m->cfg) : config_from_hf(m->hf, &m->cfg);
  if (!rc)
    rc = check_tensors(m);
  if (!rc)
    rc = open_tokenizer(m);
  if (!rc)
    rc = collect_tensor_names(m);
  if (rc) {
    pa_model_close(m);
    return rc;
  }
  *out = m;
  return PA_OK;
}

void pa_model_close(pa_model *m) {
  if (!m)
    return;
  for (size_t i = 0; m->tensor_names && i < m->n_tensors; i++)
    free(m->tensor_names[i]);
  free(m->tensor_names);
  pa_chat_template_destroy(m->chat);
  pa_tokenizer_destroy(m->tok);
  pa_gguf_close(m->gguf);
  pa_hfdir_close(m->hf);
  free(m->path);
  free(m);
}

const char *pa_model_path(const pa_model *m) { return m->path; }
const char *pa_model_format(const pa_model *m) { return m->gguf ? "gguf" : "safetensors"; }
const pa_model_config *pa_model_config_get(const pa_model *m) { return &m->cfg; }
const pa_tokenizer *pa_model_tokenizer(const pa_model *m) { return m->tok; }
const pa_chat_template *pa_model_chat(const pa_model *m) { return m->chat; }
size_t pa_model_n_tensors(const pa_model *m) { return m->n_tensors; }

void pa_model_tensor_info(const pa_model *m, size_t i, pa_tensor_info *out) {
  memset(out, 0, sizeof *out);
  out->name = m->tensor_names[i];
  if (m->gguf) {
    const pa_gguf_tensor *t = pa_gguf_tensor_at(m->gguf, i);
    out->type = t->type;
    out->type_name = pa_dtype_name(t->type);
    out->n_dims = t->n_dims;
    for (uint32_t d = 0; d < t->n_dims; d++)
      out->shape[d] = t->ne[t->n_dims - 1 - d];
    out->nbytes = t->nbytes;
  } else {
    const pa_st_tensor *t = pa_hfdir_tensor_at(m->hf, i);
    out->type = t->dtype;
    out->type_name = t->dtype_name;
    out->n_dims = t->n_dims > 4 ? 4 : t->n_dims;
    for (uint32_t d = 0; d < out->n_dims; d++)
      out->shape[d] = t->shape[d];
    out->nbytes = t->nbytes;
  }
}
