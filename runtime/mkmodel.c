#include "mkmodel.h"

#include "fileio.h"

#include "bpe_train.h"
#include "gguf.h"
#include "quant.h"
#include "safetensors.h"
#include "rng.h"
#include "status.h"

#include <cJSON.h>

#include <dirent.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

/* The BPE training text: plain English in the register of the prompts palign
 * sends (questionnaire items, answers, instructions), so the merges look like
 * a real tokenizer's at small scale. ASCII only; the pre-tokenizer the trainer
 * uses is exact for ASCII. Changing it changes every test model's vocabulary. */
static const char corpus[] =
    "Personality questionnaires ask people to describe themselves. Each item is a short statement, "
    "and the person says how well it describes them, from very inaccurate to very accurate. "
    "The answers are usually given on a scale from 1 to 5, where 1 means strongly disagree and 5 "
    "means strongly agree.\n\n"
    "The Big Five model describes personality with five broad traits: openness to experience, "
    "conscientiousness, extraversion, agreeableness, and neuroticism. Each trait is measured by "
    "many items, and each item belongs to one facet of one trait.\n"
    "Openness describes a person who is curious, imaginative and interested in new ideas. "
    "Conscientiousness describes a person who is organized, careful and dependable. "
    "Extraversion describes a person who is outgoing, energetic and talkative. "
    "Agreeableness describes a person who is kind, cooperative and trusting. "
    "Neuroticism describes a person who is anxious, moody and easily stressed.\n\n"
    "Here are some items from the inventory:\n"
    "I am the life of the party. I don't talk a lot. I feel comfortable around people. "
    "I keep in the background. I start conversations. I have little to say. "
    "I talk to a lot of different people at parties. I don't like to draw attention to myself. "
    "I am interested in people. I insult people. I sympathize with others' feelings. "
    "I am not interested in other people's problems. I have a soft heart. "
    "I take time out for others. I feel others' emotions. I make people feel at ease.\n"
    "I am always prepared. I leave my belongings around. I pay attention to details. "
    "I make a mess of things. I get chores done right away. I often forget to put things back "
    "in their proper place. I like order. I shirk my duties. I follow a schedule. "
    "I am exacting in my work.\n"
    "I get stressed out easily. I am relaxed most of the time. I worry about things. "
    "I seldom feel blue. I am easily disturbed. I get upset easily. I change my mood a lot. "
    "I have frequent mood swings. I get irritated easily. I often feel blue.\n"
    "I have a rich vocabulary. I have difficulty understanding abstract ideas. "
    "I have a vivid imagination. I am not interested in abstract ideas. I have excellent ideas. "
    "I do not have a good imagination. I am quick to understand things. I use difficult words. "
    "I spend time reflecting on things. I am full of ideas.\n\n"
    "Question: Given a statement, please choose from the following options to identify how "
    "accurately this statement describes you.\n"
    "Statement: I worry about things.\n"
    "Options:\n"
    "(A). Very Accurate\n"
    "(B). Moderately Accurate\n"
    "(C). Neither Accurate Nor Inaccurate\n"
    "(D). Moderately Inaccurate\n"
    "(E). Very Inaccurate\n"
    "Answer: (B). Moderately Accurate\n\n"
    "You are a helpful assistant. Answer the question as the person described below would answer it. "
    "The person is 34 years old. She's friendly and calm, she's rarely worried, and she's always "
    "on time. He's quiet at parties but he'd rather listen than talk. They're careful with money, "
    "they've never missed a deadline, and they'll tell you what they think.\n\n"
    "A language model can be steered toward a personality by adding a direction to the activations "
    "of a few attention heads. The direction is found by training a probe on the activations of "
    "answers that agree and answers that disagree with the person. The strength of the "
    "intervention is chosen on held-out items, and the model is then evaluated on the remaining "
    "items of the questionnaire. A second method fine-tunes the model with preference pairs, "
    "where the preferred answer is the one the person gave and the rejected answer is its "
    "opposite. Both methods are compared with prompting, where the description of the person "
    "is written into the prompt.\n\n"
    "The results are written to a store, one record for each subject, with the scores for "
    "every trait and every method. A summary table shows the mean error and the correlation "
    "between the predicted and the true answers. Lower error is better; higher correlation is "
    "better. When a job is stopped, it can be started again and it will continue where it left "
    "off, because every finished subject is already in the store.\n";

const char pa_mkmodel_chat_template[] =
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% endif %}";

/* Qwen2.5's rules for the system turn (its own, or Qwen's default when the
 * conversation brings none), in a template written for palign's tests. */
const char pa_mkmodel_qwen2_chat_template[] =
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}{%- if message.role != 'system' or not loop.first %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}";

/* Qwen2's pre-tokenizer regex, as its tokenizer.json writes it. */
static const char qwen2_regex[] = "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+"
                                  "[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";

const char *pa_mkmodel_arch_name(pa_mkmodel_arch a) { return a == PA_MK_QWEN2 ? "qwen2" : "llama"; }

enum { TOK_EOT = 0, TOK_BOS = 1, TOK_EOS = 2, N_SPECIAL = 3 };
static const char *const specials[N_SPECIAL] = {"<|endoftext|>", "<|im_start|>", "<|im_end|>"};

pa_mkmodel_opts pa_mkmodel_defaults(void) {
  return (pa_mkmodel_opts){
      .n_layers = 2,
      .dim = 64,
      .n_heads = 4,
      .n_kv_heads = 2,
      .ffn_dim = 128,
      .n_merges = 300,
      .n_shards = 1,
      .max_seq = 2048,
      .seed = 1,
      .dtype = PA_F32,
      .tied = true,
      .force = false,
      .rope_theta = 10000.0f,
      .norm_eps = 1e-5f,
  };
}

/* mkmodel makes test models: a cap far above any test's needs keeps a typo
 * (--dim 65536000) from filling the disk. */
#define MAX_PARAMS 2000000000ull

int pa_mkmodel_validate(const pa_mkmodel_opts *o) {
  if (o->n_layers < 1 || o->n_layers > 1024)
    return pa_error(PA_EINVAL, "mkmodel: layers = %d, expected 1 to 1024", o->n_layers);
  if (o->dim < 2 || o->dim > 65536)
    return pa_error(PA_EINVAL, "mkmodel: dim = %d, expected 2 to 65536", o->dim);
  if (o->n_heads < 1 || o->dim % o->n_heads != 0)
    return pa_error(PA_EINVAL, "mkmodel: heads = %d must divide dim = %d", o->n_heads, o->dim);
  if ((o->dim / o->n_heads) % 2 != 0)
    return pa_error(PA_EINVAL, "mkmodel: head dim %d (dim %d / heads %d) must be even for RoPE", o->dim / o->n_heads,
                    o->dim, o->n_heads);
  if (o->n_kv_heads < 1 || o->n_heads % o->n_kv_heads != 0)
    return pa_error(PA_EINVAL, "mkmodel: kv-heads = %d must divide heads = %d", o->n_kv_heads, o->n_heads);
  if (o->ffn_dim < 1 || o->ffn_dim > 1 << 20)
    return pa_error(PA_EINVAL, "mkmodel: ffn = %d, expected 1 to %d", o->ffn_dim, 1 << 20);
  if (o->n_merges < 0 || o->n_merges > 100000)
    return pa_error(PA_EINVAL, "mkmodel: merges = %d, expected 0 to 100000", o->n_merges);
  if (o->arch != PA_MK_LLAMA && o->arch != PA_MK_QWEN2)
    return pa_error(PA_EINVAL, "mkmodel: architecture %d is neither llama nor qwen2", (int)o->arch);
  /* a shard per tensor at most: embeddings, 9 per layer (12 with biases), the final norm */
  const int64_t per_layer_tensors = o->arch == PA_MK_QWEN2 ? 12 : 9;
  int64_t n_tensors = 2 + per_layer_tensors * (int64_t)o->n_layers + (o->tied ? 0 : 1);
  if (o->n_shards < 1 || o->n_shards > n_tensors)
    return pa_error(PA_EINVAL, "mkmodel: shards = %d, expected 1 to %lld (the number of tensors)", o->n_shards,
                    (long long)n_tensors);
  if (o->max_seq < 1 || o->max_seq > 1 << 24)
    return pa_error(PA_EINVAL, "mkmodel: max_seq = %d, expected 1 to %d", o->max_seq, 1 << 24);
  if (o->dtype != PA_F32 && o->dtype != PA_F16 && o->dtype != PA_BF16)
    return pa_error(PA_EINVAL, "mkmodel: dtype %s; expected f32, f16 or bf16", pa_dtype_name(o->dtype));
  if (!(o->rope_theta > 0) || !isfinite(o->rope_theta))
    return pa_error(PA_EINVAL, "mkmodel: rope_theta = %g must be positive", (double)o->rope_theta);
  if (!(o->norm_eps > 0) || !isfinite(o->norm_eps))
    return pa_error(PA_EINVAL, "mkmodel: norm_eps = %g must be positive", (double)o->norm_eps);
  uint64_t hd = (uint64_t)(o->dim / o->n_heads), d = (uint64_t)o->dim;
  uint64_t per_layer = 2 * d + d * hd * (2 * (uint64_t)o->n_heads + 2 * (uint64_t)o->n_kv_heads) +
                       3 * d * (uint64_t)o->ffn_dim + hd * ((uint64_t)o->n_heads + 2 * (uint64_t)o->n_kv_heads);
  uint64_t vocab_max = N_SPECIAL + 256 + (uint64_t)o->n_merges;
  uint64_t params = per_layer * (uint64_t)o->n_layers + d * vocab_max * (o->tied ? 1 : 2) + d;
  if (params > MAX_PARAMS)
    return pa_error(PA_EINVAL, "mkmodel: %llu parameters is more than a test model needs (limit %llu)",
                    (unsigned long long)params, MAX_PARAMS);
  return PA_OK;
}

/* ---- the model in memory --------------------------------------------------------- */

typedef struct {
  char hf[96], gguf[64];
  uint32_t n_dims;
  uint64_t shape[2]; /* Hugging Face order: [out, in] */
  int32_t qk_heads;  /* >0: rows are n heads of Q or K, permuted for a llama GGUF */
  bool bias;         /* a projection's bias (not a norm weight) */
  float *val;        /* already rounded to the storage dtype */
} mk_tensor;

typedef struct {
  pa_mkmodel_opts o;
  int32_t head_dim, vocab;
  pa_bpe_vocab *bpe;
  size_t n;
  mk_tensor *t;
} mk_model;


static float round_to(uint32_t dtype, float v) {
  if (dtype == PA_F16)
    return pa_f16_to_f32(pa_f32_to_f16(v));
  if (dtype == PA_BF16)
    return pa_bf16_to_f32(pa_f32_to_bf16(v));
  return v;
}

static void fill(const mk_model *m, mk_tensor *t) {
  uint64_t s = m->o.seed ^ pa_fnv1a64(t->hf);
  uint64_t n = t->shape[0] * (t->n_dims == 2 ? t->shape[1] : 1);
  for (uint64_t i = 0; i < n; i++) {
    double v;
    if (t->bias) {
      v = pa_uniform24(&s) - 0.5;
    } else if (t->n_dims == 1) {
      v = 0.9 + 0.2 * pa_uniform24(&s);
    } else {
      /* four uniforms sum to mean 2, variance 1/3: scale to sd 0.02 */
      double u = pa_uniform24(&s) + pa_uniform24(&s) + pa_uniform24(&s) + pa_uniform24(&s);
      v = (u - 2.0) * (0.02 * 1.7320508075688772);
    }
    t->val[i] = round_to(m->o.dtype, (float)v);
  }
}

static void mk_free(mk_model *m) {
  for (size_t i = 0; i < m->n; i++)
    free(m->t[i].val);
  free(m->t);
  pa_bpe_vocab_destroy(m->bpe);
}

static int add(mk_model *m, const char *hf, const char *gguf, uint64_t rows, uint64_t cols, int32_t qk_heads,
               bool bias) {
  mk_tensor *t = &m->t[m->n];
  snprintf(t->hf, sizeof t->hf, "%s", hf);
  snprintf(t->gguf, sizeof t->gguf, "%s", gguf);
  t->n_dims = cols ? 2 : 1;
  t->shape[0] = rows;
  t->shape[1] = cols ? cols : 1;
  t->qk_heads = qk_heads;
  t->bias = bias;
  if (!(t->val = malloc(rows * t->shape[1] * sizeof *t->val)))
    return pa_error(PA_ENOMEM, "mkmodel: no memory for %s", hf);
  m->n++;
  fill(m, t);
  return PA_OK;
}

static int mk_build(const pa_mkmodel_opts *o, mk_model *m) {
  memset(m, 0, sizeof *m);
  m->o = *o;
  int rc = pa_mkmodel_validate(o);
  if (rc)
    return rc;
  if ((rc = pa_bpe_train(corpus, sizeof corpus - 1, o->n_merges, &m->bpe)))
    return pa_error_prefix(rc, "mkmodel: ");
  m->vocab = (int32_t)(N_SPECIAL + pa_bpe_vocab_n_tokens(m->bpe));
  m->head_dim = o->dim / o->n_heads;
  const uint64_t d = (uint64_t)o->dim, v = (uint64_t)m->vocab, f = (uint64_t)o->ffn_dim;
  const uint64_t q = (uint64_t)o->n_heads * (uint64_t)m->head_dim, kv = (uint64_t)o->n_kv_heads * (uint64_t)m->head_dim;
  m->t = calloc(3 + 12 * (size_t)o->n_layers, sizeof *m->t);
  if (!m->t)
    return pa_error(PA_ENOMEM, "mkmodel: no memory");
  if ((rc = add(m, "model.embed_tokens.weight", "token_embd.weight", v, d, 0, false)))
    return rc;
  for (int32_t l = 0; l < o->n_layers; l++) {
    static const struct {
      const char *hf, *gguf;
      int rows, cols, qk; /* 0: none, 1: dim, 2: q, 3: kv, 4: ffn */
    } per_layer[] = {
        {"input_layernorm", "attn_norm", 1, 0, 0},    {"self_attn.q_proj", "attn_q", 2, 1, 1},
        {"self_attn.k_proj", "attn_k", 3, 1, 2},      {"self_attn.v_proj", "attn_v", 3, 1, 0},
        {"self_attn.o_proj", "attn_output", 1, 2, 0}, {"post_attention_layernorm", "ffn_norm", 1, 0, 0},
        {"mlp.gate_proj", "ffn_gate", 4, 1, 0},       {"mlp.up_proj", "ffn_up", 4, 1, 0},
        {"mlp.down_proj", "ffn_down", 1, 4, 0},
    };
    const uint64_t size[5] = {0, d, q, kv, f};
    for (size_t k = 0; k < sizeof per_layer / sizeof per_layer[0]; k++) {
      char hf[96], gg[64];
      snprintf(hf, sizeof hf, "model.layers.%d.%s.weight", l, per_layer[k].hf);
      snprintf(gg, sizeof gg, "blk.%d.%s.weight", l, per_layer[k].gguf);
      int32_t heads = per_layer[k].qk == 1 ? o->n_heads : per_layer[k].qk == 2 ? o->n_kv_heads : 0;
      if ((rc = add(m, hf, gg, size[per_layer[k].rows], size[per_layer[k].cols], heads, false)))
        return rc;
    }
    if (o->arch == PA_MK_QWEN2) {
      static const struct {
        const char *hf, *gguf;
        bool q;
      } biases[] = {{"q_proj", "attn_q", true}, {"k_proj", "attn_k", false}, {"v_proj", "attn_v", false}};
      for (size_t k = 0; k < sizeof biases / sizeof biases[0]; k++) {
        char hf[96], gg[64];
        snprintf(hf, sizeof hf, "model.layers.%d.self_attn.%s.bias", l, biases[k].hf);
        snprintf(gg, sizeof gg, "blk.%d.%s.bias", l, biases[k].gguf);
        if ((rc = add(m, hf, gg, biases[k].q ? q : kv, 0, 0, true)))
          return rc;
      }
    }
  }
  if ((rc = add(m, "model.norm.weight", "output_norm.weight", d, 0, 0, false)))
    return rc;
  if (!o->tied && (rc = add(m, "lm_head.weight", "output.weight", v, d, 0, false)))
    return rc;
  return PA_OK;
}

/* The tensor's values in the storage dtype (1-D tensors stay fp32 in GGUF,
 * as llama.cpp writes them). A llama GGUF's Q/K rows are permuted. Caller
 * frees. */
static void *encode(const mk_model *m, const mk_tensor *t, bool gguf, uint32_t *dtype, uint64_t *nbytes) {
  uint64_t rows = t->shape[0], cols = t->shape[1], n = rows * cols;
  *dtype = gguf && t->n_dims == 1 ? PA_F32 : m->o.dtype;
  size_t es = *dtype == PA_F32 ? 4 : 2;
  uint8_t *out = malloc(n * es);
  if (!out)
    return NULL;
  *nbytes = n * es;
  const uint64_t hd = (uint64_t)m->head_dim, half = hd / 2;
  for (uint64_t r = 0; r < rows; r++) {
    /* llama.cpp's RoPE rotates adjacent pairs (2b, 2b+1); HF's rotates
     * (b, b + hd/2). Row a*hd/2 + b of each head moves to row 2b + a. */
    uint64_t dst = r;
    if (gguf && t->qk_heads > 0 && m->o.arch == PA_MK_LLAMA) {
      uint64_t h = r / hd, a = (r % hd) / half, b = r % half;
      dst = h * hd + 2 * b + a;
    }
    const float *src = t->val + r * cols;
    uint8_t *o = out + dst * cols * es;
    for (uint64_t c = 0; c < cols; c++) {
      if (*dtype == PA_F32) {
        memcpy(o + 4 * c, &src[c], 4);
      } else {
        uint16_t h16 = *dtype == PA_F16 ? pa_f32_to_f16(src[c]) : pa_f32_to_bf16(src[c]);
        memcpy(o + 2 * c, &h16, 2);
      }
    }
  }
  return out;
}

/* ---- output files ------------------------------------------------------------------ */

static int write_atomic(const char *path, const char *text) {
  const pa_chunk chunk = {text, strlen(text)};
  return pa_write_atomic(path, &chunk, 1);
}

static int write_json(const char *path, cJSON *j) {
  char *text = j ? cJSON_Print(j) : NULL;
  if (!text)
    return pa_error(PA_ENOMEM, "%s: no memory", path);
  size_t n = strlen(text);
  char *nl = realloc(text, n + 2); /* end with a newline like every text file */
  if (!nl) {
    free(text);
    return pa_error(PA_ENOMEM, "%s: no memory", path);
  }
  nl[n] = '\n';
  nl[n + 1] = '\0';
  int rc = write_atomic(path, nl);
  free(nl);
  return rc;
}

/* A float as the shortest decimal that reads back as the same float, so
 * config.json says 1e-05 and not 9.99999974737875e-06. */
static double short_decimal(float f) {
  char buf[32];
  for (int p = 1; p <= 9; p++) {
    snprintf(buf, sizeof buf, "%.*g", p, (double)f);
    if ((float)strtod(buf, NULL) == f)
      break;
  }
  return strtod(buf, NULL);
}

static const char *dtype_torch(uint32_t t) { return t == PA_F16 ? "float16" : t == PA_BF16 ? "bfloat16" : "float32"; }

static const char *token_text(const mk_model *m, int32_t id) {
  return id < N_SPECIAL ? specials[id] : pa_bpe_vocab_token(m->bpe, (size_t)(id - N_SPECIAL));
}

static int check_target_file(const pa_mkmodel_opts *o, const char *path) {
  struct stat sb;
  if (stat(path, &sb) != 0)
    return errno == ENOENT ? PA_OK : pa_error(PA_EIO, "%s: cannot check: %s", path, strerror(errno));
  if (S_ISDIR(sb.st_mode))
    return pa_error(PA_EINVAL, "%s: is a directory (a GGUF output is a file)", path);
  if (!o->force)
    return pa_error(PA_EINVAL, "%s: already exists (use --force to overwrite it)", path);
  return PA_OK;
}

int pa_mkmodel_write_gguf(const pa_mkmodel_opts *o, const char *path) {
  mk_model m;
  pa_gguf_writer *w = NULL;
  const char **toks = NULL, **merges = NULL;
  int32_t *types = NULL;
  int rc = check_target_file(o, path);
  if (!rc)
    rc = mk_build(o, &m);
  else
    memset(&m, 0, sizeof m);
  if (!rc)
    rc = pa_gguf_writer_create(&w);
  if (rc)
    goto done;
  size_t n_merges = pa_bpe_vocab_n_merges(m.bpe);
  toks = malloc((size_t)m.vocab * sizeof *toks);
  types = malloc((size_t)m.vocab * sizeof *types);
  merges = malloc((n_merges ? n_merges : 1) * sizeof *merges);
  if (!toks || !types || !merges) {
    rc = pa_error(PA_ENOMEM, "%s: no memory", path);
    goto done;
  }
  for (int32_t i = 0; i < m.vocab; i++) {
    toks[i] = token_text(&m, i);
    types[i] = i < N_SPECIAL ? 3 : 1; /* control : normal */
  }
  for (size_t i = 0; i < n_merges; i++)
    merges[i] = pa_bpe_vocab_merge(m.bpe, i);
  uint32_t file_type = o->dtype == PA_F32 ? 0 : o->dtype == PA_F16 ? 1 : 32; /* llama_ftype */
  const bool qwen2 = o->arch == PA_MK_QWEN2;
  const char *arch = pa_mkmodel_arch_name(o->arch);
  char key[10][64];
  static const char *const arch_keys[10] = {"block_count",          "context_length",
                                            "embedding_length",     "feed_forward_length",
                                            "attention.head_count", "attention.head_count_kv",
                                            "rope.freq_base",       "attention.layer_norm_rms_epsilon",
                                            "rope.dimension_count", "vocab_size"};
  for (int k = 0; k < 10; k++)
    snprintf(key[k], sizeof key[k], "%s.%s", arch, arch_keys[k]);
  bool bad =
      pa_gguf_set_str(w, "general.architecture", arch) || pa_gguf_set_str(w, "general.name", "palign-mkmodel") ||
      pa_gguf_set_u32(w, "general.file_type", file_type) || pa_gguf_set_u32(w, key[0], (uint32_t)o->n_layers) ||
      pa_gguf_set_u32(w, key[1], (uint32_t)o->max_seq) || pa_gguf_set_u32(w, key[2], (uint32_t)o->dim) ||
      pa_gguf_set_u32(w, key[3], (uint32_t)o->ffn_dim) || pa_gguf_set_u32(w, key[4], (uint32_t)o->n_heads) ||
      pa_gguf_set_u32(w, key[5], (uint32_t)o->n_kv_heads) || pa_gguf_set_f32(w, key[6], o->rope_theta) ||
      pa_gguf_set_f32(w, key[7], o->norm_eps) || pa_gguf_set_u32(w, key[8], (uint32_t)m.head_dim) ||
      pa_gguf_set_u32(w, key[9], (uint32_t)m.vocab) || pa_gguf_set_str(w, "tokenizer.ggml.model", "gpt2") ||
      pa_gguf_set_str(w, "tokenizer.ggml.pre", qwen2 ? "qwen2" : "smollm") ||
      pa_gguf_set_arr_str(w, "tokenizer.ggml.tokens", toks, (size_t)m.vocab) ||
      pa_gguf_set_arr_i32(w, "tokenizer.ggml.token_type", types, (size_t)m.vocab) ||
      pa_gguf_set_arr_str(w, "tokenizer.ggml.merges", merges, n_merges) ||
      pa_gguf_set_u32(w, "tokenizer.ggml.bos_token_id", qwen2 ? TOK_EOT : TOK_BOS) ||
      pa_gguf_set_u32(w, "tokenizer.ggml.eos_token_id", TOK_EOS) ||
      (!qwen2 && pa_gguf_set_u32(w, "tokenizer.ggml.unknown_token_id", TOK_EOT)) ||
      pa_gguf_set_u32(w, "tokenizer.ggml.padding_token_id", qwen2 ? TOK_EOT : TOK_EOS) ||
      pa_gguf_set_bool(w, "tokenizer.ggml.add_bos_token", false) ||
      pa_gguf_set_bool(w, "tokenizer.ggml.add_eos_token", false) ||
      pa_gguf_set_str(w, "tokenizer.chat_template", qwen2 ? pa_mkmodel_qwen2_chat_template : pa_mkmodel_chat_template);
  if (bad) {
    rc = pa_error(PA_ENOMEM, "%s: no memory for the metadata", path);
    goto done;
  }
  for (size_t i = 0; i < m.n && !rc; i++) {
    const mk_tensor *t = &m.t[i];
    uint32_t dtype;
    uint64_t nbytes, ne[2] = {t->shape[1], t->shape[0]}; /* fastest first */
    void *data = encode(&m, t, true, &dtype, &nbytes);
    if (!data) {
      rc = pa_error(PA_ENOMEM, "%s: no memory for %s", path, t->gguf);
      break;
    }
    if (t->n_dims == 1)
      ne[0] = t->shape[0];
    rc = pa_gguf_add_tensor(w, t->gguf, dtype, t->n_dims, ne, data);
    free(data);
    if (rc)
      pa_error_prefix(rc, "%s: ", path);
  }
  if (!rc)
    rc = pa_gguf_writer_write(w, path);
done:
  free(toks);
  free(types);
  free(merges);
  pa_gguf_writer_destroy(w);
  mk_free(&m);
  return rc;
}

/* ---- Hugging Face directory ------------------------------------------------------------ */

static bool is_our_weights_file(const char *name) {
  size_t n = strlen(name);
  static const char suffix[] = ".safetensors";
  if (strcmp(name, "model.safetensors") == 0 || strcmp(name, "model.safetensors.index.json") == 0)
    return true;
  return strncmp(name, "model-", 6) == 0 && strstr(name, "-of-") && n > sizeof suffix &&
         strcmp(name + n - (sizeof suffix - 1), suffix) == 0;
}

/* Creates dir or checks that it may be written; with force, clears weights a
 * previous run left, which the loader would otherwise prefer or mix in. */
static int prepare_dir(const pa_mkmodel_opts *o, const char *dir) {
  struct stat sb;
  if (stat(dir, &sb) != 0) {
    if (errno != ENOENT)
      return pa_error(PA_EIO, "%s: cannot check: %s", dir, strerror(errno));
    if (mkdir(dir, 0777) != 0)
      return pa_error(PA_EIO, "%s: cannot create the directory: %s", dir, strerror(errno));
    return PA_OK;
  }
  if (!S_ISDIR(sb.st_mode))
    return pa_error(PA_EINVAL, "%s: exists and is not a directory", dir);
  DIR *d = opendir(dir);
  if (!d)
    return pa_error(PA_EIO, "%s: cannot list: %s", dir, strerror(errno));
  int rc = PA_OK;
  struct dirent *e;
  while (!rc && (e = readdir(d))) {
    if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0)
      continue;
    if (!o->force) {
      rc = pa_error(PA_EINVAL, "%s: directory is not empty (use --force to write into it)", dir);
    } else if (is_our_weights_file(e->d_name)) {
      char path[4096];
      snprintf(path, sizeof path, "%s/%s", dir, e->d_name);
      if (unlink(path) != 0)
        rc = pa_error(PA_EIO, "%s: cannot remove an old weights file: %s", path, strerror(errno));
    }
  }
  closedir(d);
  return rc;
}

/* config.json in the shape Llama's (SmolLM2's) or Qwen2's has. */
static cJSON *config_json(const mk_model *m) {
  const pa_mkmodel_opts *o = &m->o;
  const bool qwen2 = o->arch == PA_MK_QWEN2;
  cJSON *c = cJSON_CreateObject();
  cJSON *arch = cJSON_AddArrayToObject(c, "architectures");
  cJSON_AddItemToArray(arch, cJSON_CreateString(qwen2 ? "Qwen2ForCausalLM" : "LlamaForCausalLM"));
  if (!qwen2)
    cJSON_AddBoolToObject(c, "attention_bias", false);
  cJSON_AddNumberToObject(c, "attention_dropout", 0.0);
  cJSON_AddNumberToObject(c, "bos_token_id", qwen2 ? TOK_EOT : TOK_BOS);
  cJSON_AddNumberToObject(c, "eos_token_id", TOK_EOS);
  if (!qwen2)
    cJSON_AddNumberToObject(c, "head_dim", m->head_dim);
  cJSON_AddStringToObject(c, "hidden_act", "silu");
  cJSON_AddNumberToObject(c, "hidden_size", o->dim);
  cJSON_AddNumberToObject(c, "initializer_range", 0.02);
  cJSON_AddNumberToObject(c, "intermediate_size", o->ffn_dim);
  cJSON_AddNumberToObject(c, "max_position_embeddings", o->max_seq);
  if (qwen2)
    cJSON_AddNumberToObject(c, "max_window_layers", o->n_layers);
  else
    cJSON_AddBoolToObject(c, "mlp_bias", false);
  cJSON_AddStringToObject(c, "model_type", pa_mkmodel_arch_name(o->arch));
  cJSON_AddNumberToObject(c, "num_attention_heads", o->n_heads);
  cJSON_AddNumberToObject(c, "num_hidden_layers", o->n_layers);
  cJSON_AddNumberToObject(c, "num_key_value_heads", o->n_kv_heads);
  if (!qwen2) {
    cJSON_AddNumberToObject(c, "pad_token_id", TOK_EOS);
    cJSON_AddNumberToObject(c, "pretraining_tp", 1);
  }
  cJSON_AddNumberToObject(c, "rms_norm_eps", short_decimal(o->norm_eps));
  cJSON_AddNullToObject(c, "rope_scaling");
  cJSON_AddNumberToObject(c, "rope_theta", short_decimal(o->rope_theta));
  if (qwen2)
    cJSON_AddNumberToObject(c, "sliding_window", o->max_seq);
  cJSON_AddBoolToObject(c, "tie_word_embeddings", o->tied);
  cJSON_AddStringToObject(c, "torch_dtype", dtype_torch(o->dtype));
  cJSON_AddBoolToObject(c, "use_cache", true);
  if (qwen2)
    cJSON_AddBoolToObject(c, "use_sliding_window", false);
  cJSON_AddNumberToObject(c, "vocab_size", m->vocab);
  return c;
}

static cJSON *special_token(int32_t id, bool with_id) {
  cJSON *t = cJSON_CreateObject();
  if (with_id)
    cJSON_AddNumberToObject(t, "id", id);
  cJSON_AddStringToObject(t, "content", specials[id]);
  cJSON_AddBoolToObject(t, "single_word", false);
  cJSON_AddBoolToObject(t, "lstrip", false);
  cJSON_AddBoolToObject(t, "rstrip", false);
  cJSON_AddBoolToObject(t, "normalized", false);
  cJSON_AddBoolToObject(t, "special", true);
  return t;
}

static cJSON *byte_level(bool add_prefix_space, bool trim_offsets, bool use_regex) {
  cJSON *b = cJSON_CreateObject();
  cJSON_AddStringToObject(b, "type", "ByteLevel");
  cJSON_AddBoolToObject(b, "add_prefix_space", add_prefix_space);
  cJSON_AddBoolToObject(b, "trim_offsets", trim_offsets);
  cJSON_AddBoolToObject(b, "use_regex", use_regex);
  return b;
}

/* tokenizer.json in the shape SmolLM2's (llama) or Qwen2's has, for the
 * `tokenizers` library. */
static cJSON *tokenizer_json(const mk_model *m) {
  const bool qwen2 = m->o.arch == PA_MK_QWEN2;
  cJSON *j = cJSON_CreateObject();
  cJSON_AddStringToObject(j, "version", "1.0");
  cJSON_AddNullToObject(j, "truncation");
  cJSON_AddNullToObject(j, "padding");
  cJSON *added = cJSON_AddArrayToObject(j, "added_tokens");
  for (int32_t i = 0; i < N_SPECIAL; i++)
    cJSON_AddItemToArray(added, special_token(i, true));
  if (qwen2)
    cJSON_AddStringToObject(cJSON_AddObjectToObject(j, "normalizer"), "type", "NFC");
  else
    cJSON_AddNullToObject(j, "normalizer");
  cJSON *pre = cJSON_AddObjectToObject(j, "pre_tokenizer");
  cJSON_AddStringToObject(pre, "type", "Sequence");
  cJSON *seq = cJSON_AddArrayToObject(pre, "pretokenizers");
  if (qwen2) {
    cJSON *split = cJSON_CreateObject();
    cJSON_AddStringToObject(split, "type", "Split");
    cJSON_AddStringToObject(cJSON_AddObjectToObject(split, "pattern"), "Regex", qwen2_regex);
    cJSON_AddStringToObject(split, "behavior", "Isolated");
    cJSON_AddBoolToObject(split, "invert", false);
    cJSON_AddItemToArray(seq, split);
    cJSON_AddItemToArray(seq, byte_level(false, false, false));
  } else {
    cJSON *digits = cJSON_CreateObject();
    cJSON_AddStringToObject(digits, "type", "Digits");
    cJSON_AddBoolToObject(digits, "individual_digits", true);
    cJSON_AddItemToArray(seq, digits);
    cJSON_AddItemToArray(seq, byte_level(false, true, true));
  }
  cJSON_AddItemToObject(j, "post_processor", byte_level(!qwen2, false, !qwen2));
  cJSON_AddItemToObject(j, "decoder", byte_level(!qwen2, !qwen2, !qwen2));
  cJSON *model = cJSON_AddObjectToObject(j, "model");
  cJSON_AddStringToObject(model, "type", "BPE");
  cJSON_AddNullToObject(model, "dropout");
  cJSON_AddNullToObject(model, "unk_token");
  cJSON_AddNullToObject(model, "continuing_subword_prefix");
  cJSON_AddNullToObject(model, "end_of_word_suffix");
  cJSON_AddBoolToObject(model, "fuse_unk", false);
  cJSON_AddBoolToObject(model, "byte_fallback", false);
  cJSON *vocab = cJSON_AddObjectToObject(model, "vocab");
  for (int32_t i = 0; i < m->vocab; i++)
    cJSON_AddNumberToObject(vocab, token_text(m, i), i);
  cJSON *merges = cJSON_AddArrayToObject(model, "merges");
  for (size_t i = 0; i < pa_bpe_vocab_n_merges(m->bpe); i++)
    cJSON_AddItemToArray(merges, cJSON_CreateString(pa_bpe_vocab_merge(m->bpe, i)));
  return j;
}

static cJSON *tokenizer_config_json(const mk_model *m) {
  cJSON *c = cJSON_CreateObject();
  cJSON_AddBoolToObject(c, "add_prefix_space", false);
  cJSON *dec = cJSON_AddObjectToObject(c, "added_tokens_decoder");
  for (int32_t i = 0; i < N_SPECIAL; i++) {
    char id[12];
    snprintf(id, sizeof id, "%d", (int)i);
    cJSON_AddItemToObject(dec, id, special_token(i, false));
  }
  cJSON *extra = cJSON_AddArrayToObject(c, "additional_special_tokens");
  cJSON_AddItemToArray(extra, cJSON_CreateString(specials[TOK_BOS]));
  cJSON_AddItemToArray(extra, cJSON_CreateString(specials[TOK_EOS]));
  const bool qwen2 = m->o.arch == PA_MK_QWEN2;
  /* Qwen2's own file says null for bos; <|endoftext|> is the bos its
   * config.json and GGUF files name, so both formats describe one tokenizer */
  cJSON_AddStringToObject(c, "bos_token", specials[qwen2 ? TOK_EOT : TOK_BOS]);
  cJSON_AddStringToObject(c, "chat_template", qwen2 ? pa_mkmodel_qwen2_chat_template : pa_mkmodel_chat_template);
  cJSON_AddBoolToObject(c, "clean_up_tokenization_spaces", false);
  cJSON_AddStringToObject(c, "eos_token", specials[TOK_EOS]);
  cJSON_AddNumberToObject(c, "model_max_length", m->o.max_seq);
  cJSON_AddStringToObject(c, "pad_token", specials[qwen2 ? TOK_EOT : TOK_EOS]);
  cJSON_AddStringToObject(c, "tokenizer_class", qwen2 ? "Qwen2Tokenizer" : "GPT2Tokenizer");
  if (qwen2)
    cJSON_AddNullToObject(c, "unk_token");
  else
    cJSON_AddStringToObject(c, "unk_token", specials[TOK_EOT]);
  cJSON_AddNumberToObject(c, "vocab_size", m->vocab);
  return c;
}

/* Shard of each tensor: contiguous runs of about equal size, none empty.
 * (Element counts times shards stay far below 2^64: MAX_PARAMS bounds both.) */
static void assign_shards(const mk_model *m, int32_t *shard) {
  uint64_t total = 0, before = 0;
  for (size_t i = 0; i < m->n; i++)
    total += m->t[i].shape[0] * m->t[i].shape[1];
  const int64_t ns = m->o.n_shards, nt = (int64_t)m->n;
  for (int64_t i = 0; i < nt; i++) {
    int64_t s = (int64_t)(before * (uint64_t)ns / total);
    if (i > 0 && s > shard[i - 1] + 1)
      s = shard[i - 1] + 1; /* never skip a shard */
    if (s < ns - (nt - i))
      s = ns - (nt - i); /* leave a tensor for every later shard */
    shard[i] = (int32_t)s;
    before += m->t[i].shape[0] * m->t[i].shape[1];
  }
}

static int write_weights(const mk_model *m, const char *dir) {
  const int32_t ns = m->o.n_shards;
  int32_t *shard = malloc(m->n * sizeof *shard);
  pa_st_tensor *st = calloc(m->n, sizeof *st);
  void **bufs = calloc(m->n, sizeof *bufs);
  cJSON *index = NULL;
  int rc = PA_OK;
  char path[4096], file[64];
  if (!shard || !st || !bufs) {
    rc = pa_error(PA_ENOMEM, "%s: no memory", dir);
    goto done;
  }
  assign_shards(m, shard);
  uint64_t total = 0;
  for (size_t i = 0; i < m->n; i++) {
    const mk_tensor *t = &m->t[i];
    uint64_t nbytes;
    uint32_t dtype;
    if (!(bufs[i] = encode(m, t, false, &dtype, &nbytes))) {
      rc = pa_error(PA_ENOMEM, "%s: no memory for %s", dir, t->hf);
      goto done;
    }
    st[i] = (pa_st_tensor){.name = t->hf, .dtype = dtype, .n_dims = t->n_dims, .data = bufs[i]};
    st[i].shape[0] = t->shape[0];
    st[i].shape[1] = t->shape[1];
    total += nbytes;
  }
  static const pa_st_meta meta[] = {{"format", "pt"}};
  if (ns == 1) {
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    rc = pa_safetensors_write(path, st, m->n, meta, 1);
    goto done;
  }
  index = cJSON_CreateObject();
  cJSON *md = cJSON_AddObjectToObject(index, "metadata");
  cJSON_AddNumberToObject(md, "total_size", (double)total);
  cJSON *wm = cJSON_AddObjectToObject(index, "weight_map");
  for (size_t first = 0; first < m->n && !rc;) {
    size_t last = first;
    while (last < m->n && shard[last] == shard[first])
      last++;
    snprintf(file, sizeof file, "model-%05d-of-%05d.safetensors", shard[first] + 1, ns);
    snprintf(path, sizeof path, "%s/%s", dir, file);
    rc = pa_safetensors_write(path, st + first, last - first, meta, 1);
    for (size_t i = first; i < last; i++)
      cJSON_AddStringToObject(wm, st[i].name, file);
    first = last;
  }
  if (!rc) {
    snprintf(path, sizeof path, "%s/model.safetensors.index.json", dir);
    rc = write_json(path, index);
  }
done:
  if (bufs)
    for (size_t i = 0; i < m->n; i++)
      free(bufs[i]);
  free(bufs);
  free(st);
  free(shard);
  cJSON_Delete(index);
  return rc;
}

int pa_mkmodel_write_hf(const pa_mkmodel_opts *o, const char *dir) {
  mk_model m;
  int rc = mk_build(o, &m);
  /* room in the fixed path buffers for "/" and any file name */
  if (!rc && strlen(dir) > 3800)
    rc = pa_error(PA_EINVAL, "%.100s...: path too long", dir);
  if (!rc)
    rc = prepare_dir(o, dir);
  if (!rc)
    rc = write_weights(&m, dir);
  /* config.json last: a directory that has it has everything before it */
  static const char *const names[] = {"tokenizer.json", "tokenizer_config.json", "config.json"};
  for (size_t i = 0; i < 3 && !rc; i++) {
    char path[4096];
    snprintf(path, sizeof path, "%s/%s", dir, names[i]);
    cJSON *j = i == 0 ? tokenizer_json(&m) : i == 1 ? tokenizer_config_json(&m) : config_json(&m);
    rc = write_json(path, j);
    cJSON_Delete(j);
  }
  mk_free(&m);
  return rc;
}
