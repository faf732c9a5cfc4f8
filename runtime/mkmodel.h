/* mkmodel.h: tiny random Llama models, written as GGUF or as a Hugging Face
 * directory, so tests need no download.
 *
 * Both writers describe the same model: the same options (seed included)
 * give the same weights, bit for bit once read back as fp32, and the same
 * tokenizer, whichever format is written. Each tensor's values come from a
 * splitmix64 stream seeded by the seed and the tensor's Hugging Face name
 * (so they do not depend on the order of writing): matrices ~ N(0, 0.02)
 * (an Irwin-Hall sum of four uniforms, pure arithmetic, so identical on every
 * machine), norm weights uniform in [0.9, 1.1]. Values are rounded to the
 * storage dtype first, so an fp32 norm in a GGUF (llama.cpp keeps 1-D tensors
 * fp32) equals the bf16 one in the safetensors.
 *
 * The tokenizer is byte-level BPE with merges learned (bpe_train.h) from an
 * English text built in: ids 0..2 are <|endoftext|>, <|im_start|> and
 * <|im_end|> (eos); then the 256 byte tokens; then the merge results.
 *
 * Two architectures:
 *  - llama (SmolLM2's shape): bos <|im_start|>, SmolLM2's pre-tokenizer
 *    (digits split, then GPT-2's regex) and its ChatML template.
 *  - qwen2 (Qwen2.5's shape): Llama plus biases on Q, K and V (values in
 *    [-0.5, 0.5), large enough that a forward pass ignoring them is far
 *    off), bos <|endoftext|>, Qwen2's pre-tokenizer (its Split regex, then
 *    byte-level without a regex; NFC in tokenizer.json) and a ChatML template
 *    with Qwen's default system turn.
 *
 * GGUF follows llama.cpp's convert_hf_to_gguf.py: llama.cpp tensor names,
 * shapes listed fastest dimension first, and for llama the rows of attn_q
 * and attn_k permuted from Hugging Face's rotate-half order to the
 * interleaved order llama.cpp's RoPE expects (per head of hd rows, HF row
 * a*hd/2 + b becomes row 2*b + a); qwen2 rows stay in Hugging Face's order.
 * model.h's loader undoes that permutation.
 *
 * Output is written atomically file by file; same options give byte-identical
 * files. Errors: 0 or a negative PA_E* code with a message (status.h);
 * PA_EINVAL for bad options or an existing output without `force`.
 * Reentrant: no global state.
 */
#ifndef PALIGN_MKMODEL_H
#define PALIGN_MKMODEL_H

#include <stdbool.h>
#include <stdint.h>

typedef enum { PA_MK_LLAMA = 0, PA_MK_QWEN2 = 1 } pa_mkmodel_arch;

typedef struct {
  pa_mkmodel_arch arch;
  int32_t n_layers;
  int32_t dim; /* hidden size; head_dim = dim / n_heads, must be even */
  int32_t n_heads;
  int32_t n_kv_heads; /* divides n_heads */
  int32_t ffn_dim;
  int32_t n_merges; /* BPE merges; the built-in text allows up to 847 */
  int32_t n_shards; /* safetensors files (Hugging Face form only); 1 = model.safetensors */
  int32_t max_seq;  /* context length recorded in the metadata */
  uint64_t seed;
  uint32_t dtype; /* PA_F32, PA_F16 or PA_BF16 */
  bool tied;      /* output projection shares the token embedding */
  bool force;     /* overwrite an existing file / a non-empty directory */
  float rope_theta, norm_eps;
} pa_mkmodel_opts;

/* llama, 2 layers, dim 64, 4 heads, 2 kv heads, ffn 128, 300 merges, 1 shard,
 * max_seq 2048, seed 1, f32, tied, theta 10000, eps 1e-5. */
pa_mkmodel_opts pa_mkmodel_defaults(void);

/* Range and consistency checks; the message names the offending option. */
int pa_mkmodel_validate(const pa_mkmodel_opts *o);

/* One .gguf file (n_shards is ignored). Refuses an existing path unless
 * o->force. */
int pa_mkmodel_write_gguf(const pa_mkmodel_opts *o, const char *path);

/* A directory with config.json, model.safetensors (or n_shards files
 * model-0000i-of-0000N.safetensors and model.safetensors.index.json),
 * tokenizer.json and tokenizer_config.json. The directory is created if
 * missing (not its parents); a non-empty one is refused unless o->force, which
 * also removes weights files a previous run may have left there. */
int pa_mkmodel_write_hf(const pa_mkmodel_opts *o, const char *dir);

/* The chat templates (Jinja) both formats record: SmolLM2's ChatML (llama),
 * and a ChatML one with Qwen2.5's default system turn (qwen2). */
extern const char pa_mkmodel_chat_template[];
extern const char pa_mkmodel_qwen2_chat_template[];

/* "llama" or "qwen2". */
const char *pa_mkmodel_arch_name(pa_mkmodel_arch a);

#endif
