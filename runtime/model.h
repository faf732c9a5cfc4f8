/* model.h: one validated description of a Llama-family model and one fp32
 * weight layout, whichever file format the model came in.
 *
 * Sources: a GGUF file, or a Hugging Face directory (config.json,
 * *.safetensors, tokenizer.json, tokenizer_config.json). After pa_model_open()
 * nothing downstream asks which it was.
 *
 * Architectures: "llama" (Llama 2/3, SmolLM2), "mistral", and "qwen2"
 * (Qwen2/Qwen2.5: Llama plus biases on the Q, K and V projections).
 *
 * Weight layout (the Hugging Face orientation): every matrix is row-major
 * [out][in], fp32. Q and K rows (and the Q/K biases) are in Hugging Face's
 * rotate-half order (the two halves of each head's dimensions are the two
 * RoPE components). GGUF files of llama and mistral store them interleaved
 * (llama.cpp's convert permutes them for its adjacent-pair RoPE) and the
 * loader undoes that permutation; qwen2 GGUF files keep Hugging Face's order
 * (llama.cpp runs them with its rotate-half "NEOX" RoPE).
 */
#ifndef PALIGN_MODEL_H
#define PALIGN_MODEL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef enum {
  PA_ROPE_SCALING_NONE = 0,
  PA_ROPE_SCALING_LLAMA3 = 1, /* Llama-3.1 frequency-dependent scaling */
} pa_rope_scaling_kind;

typedef struct {
  char arch[32];  /* "llama" (Llama 2/3, SmolLM2), "mistral" or "qwen2" */
  char name[128]; /* free text from the file, may be empty */
  int32_t n_layers;
  int32_t dim;        /* hidden size */
  int32_t n_heads;    /* query heads */
  int32_t n_kv_heads; /* key/value heads (grouped-query attention) */
  int32_t head_dim;
  int32_t ffn_dim; /* SwiGLU intermediate size */
  int32_t vocab_size;
  int32_t max_seq; /* trained context length */
  float rope_theta;
  struct {
    pa_rope_scaling_kind kind;
    /* Llama-3.1 parameters when the source states them; a GGUF file may carry
     * only the resulting divisors (a rope_freqs tensor), then these are 0. */
    float factor, low_freq_factor, high_freq_factor;
    int32_t orig_max_seq;
  } rope_scaling;
  float norm_eps; /* RMSNorm epsilon */
  bool tied_embeddings; /* the output projection is the token embedding */
  bool qkv_bias;        /* the Q, K and V projections add a bias (qwen2) */
} pa_model_config;

/* Checks ranges and consistency (heads divide, head_dim even, ...);
 * `source` names the file in the message. */
int pa_model_config_validate(const pa_model_config *c, const char *source);

typedef struct {
  float *attn_norm;     /* [dim] */
  float *wq;            /* [n_heads * head_dim][dim] */
  float *wk;            /* [n_kv_heads * head_dim][dim] */
  float *wv;            /* [n_kv_heads * head_dim][dim] */
  float *wo;            /* [dim][n_heads * head_dim] */
  float *bq, *bk, *bv;  /* [n_heads * head_dim], [n_kv_heads * head_dim] x 2, or all NULL (no qkv_bias) */
  float *ffn_norm;      /* [dim] */
  float *w_gate, *w_up; /* [ffn_dim][dim] */
  float *w_down;        /* [dim][ffn_dim] */
} pa_layer_weights;

typedef struct {
  float *tok_embd; /* [vocab_size][dim] */
  float *out_norm; /* [dim] */
  float *output;   /* [vocab_size][dim]; the same pointer as tok_embd when tied */
  pa_layer_weights *layers; /* [n_layers] */
  /* RoPE frequency divisors [head_dim / 2] (frequency i is theta^(-2i/head_dim)
   * / rope_freq_div[i]), or NULL for plain RoPE. Llama-3.1 scaling is expressed
   * this way whether it came as config.json parameters or a GGUF rope_freqs
   * tensor. */
  float *rope_freq_div;
  float *arena;             /* every tensor above lives here: one allocation */
  size_t n_floats;
} pa_weights;

/* A stored tensor as the file holds it, for listing (palign inspect). */
typedef struct {
  const char *name; /* valid while the model is open */
  uint32_t type;    /* pa_dtype */
  const char *type_name; /* "Q4_1", "BF16", "I64" */
  uint32_t n_dims;
  uint64_t shape[4]; /* outermost first, as in PyTorch: [out, in] for a matrix */
  uint64_t nbytes;
} pa_tensor_info;

typedef struct pa_model pa_model;
struct pa_tokenizer;
struct pa_chat_template;

/* Opens a GGUF file or a Hugging Face model directory, validates the
 * description, builds the tokenizer and picks the chat template. Weights stay
 * on disk (mapped) until pa_model_load_weights(). */
int pa_model_open(const char *path, pa_model **out);
void pa_model_close(pa_model *m);

const char *pa_model_path(const pa_model *m);
const char *pa_model_format(const pa_model *m); /* "gguf" or "safetensors" */
const pa_model_config *pa_model_config_get(const pa_model *m);
const struct pa_tokenizer *pa_model_tokenizer(const pa_model *m);
const struct pa_chat_template *pa_model_chat(const pa_model *m);

size_t pa_model_n_tensors(const pa_model *m);
void pa_model_tensor_info(const pa_model *m, size_t i, pa_tensor_info *out);

/* Reads every weight into one fp32 arena in the layout above. */
int pa_model_load_weights(const pa_model *m, pa_weights *w);
void pa_weights_free(pa_weights *w);

#endif
