/* bank.h: PAS's activation bank (PAS.md "PAS, step by step", step 1),
 * computed with the forward pass and cached in a checked file.
 *
 * For each train item in bank order (pa_pas_bank_items: traits A, C, E, N, O,
 * train_index order within a trait) two sequences: the system prompt (default
 * PA_DEFAULT_SYSTEM), the item question (text not lowercased by default) and
 * the assistant turn opened with the prefix ("Option (") followed by the
 * letter A (sequence 2i) or E (sequence 2i+1), in the model's chat template.
 * The bank holds z[l][h] (the output of attention head h of layer l, before
 * W_o) at the last token of each sequence, the answer letter:
 *   z[s][l][h][d] at ((s * n_layers + l) * n_heads + h) * head_dim + d,
 * s < 2 * n_items, float32: the layout of pa_pas_bank (probe.h).
 *
 * All 2 n_items sequences are tokenized whole; their longest common token
 * prefix (system prompt, chat markup, the start of the question) is computed
 * once into a shared KV cache and the rest of every sequence runs against
 * it in batches, each item's question once for both of its answer letters
 * (docs/BANK.md). The model therefore sees exactly the tokens of each full
 * prompt.
 *
 * The cache file (docs/BANK.md has the byte layout): magic "PALIGNBK", a
 * format version, a JSON header with the key and how the bank was made, the
 * float32 data, and a SHA-256 of everything before it. It is keyed by the
 * model fingerprint, the inventory, the prompt settings, the prompts' token
 * ids and the dimensions; pa_bank_load refuses a file whose key differs in
 * any field (naming the file and every field that differs) or that is
 * damaged, and never returns a bank it has not fully checked.
 *
 * Errors: 0 or a negative PA_E* code with a message (status.h):
 *   PA_ENOTFOUND  the cache file (or the model path) does not exist;
 *   PA_EINVAL     bad arguments, or a cache made for another key (stale);
 *   PA_EFORMAT    a cache file that is not a bank, truncated or corrupted;
 *   PA_EUNSUPPORTED a cache file of another format version, or a prefix
 *                 after which the answer letter is not one token;
 *   PA_EIO, PA_ENOMEM.
 *
 * Ownership: a pa_bank owns its data; views and accessors borrow from it.
 * Threads: pa_bank_compute runs the model (one call per pa_lm at a time);
 * a finished bank is immutable and may be read by many threads. */
#ifndef PALIGN_BANK_H
#define PALIGN_BANK_H

#include "chat.h"
#include "forward.h"
#include "inventory.h"
#include "probe.h"
#include "tokenizer.h"

#include <stdbool.h>

#define PA_BANK_FORMAT_VERSION 1
#define PA_BANK_DEFAULT_PREFIX "Option ("

/* Zero fields take the defaults. */
typedef struct {
  bool lowercase;     /* lowercase the item text; false (PAS.md: the bank keeps the text as written) */
  const char *system; /* system prompt; NULL: PA_DEFAULT_SYSTEM ("" is an empty system message) */
  const char *prefix; /* assistant turn before the letter; NULL: PA_BANK_DEFAULT_PREFIX */
  int batch;          /* items (question + A, then E) per forward batch; 0: 32 */
  bool no_share;      /* compute every sequence whole (no shared prefix): the naive way, for comparison */
  /* for pa_bank_key_make: the weight format of the model the bank is computed
   * on (pa_lm_weights: "fp32", NULL the same, or "bf16"); a bank is made
   * from one and checked against its key on save and load */
  const char *weights;
  /* Computing the bank in parts on several ranks: this call fills only its
   * slice (0 <= slice < n_slices) of the batches (whole batches, contiguous,
   * so every sequence is computed in the same batch as by a single call and
   * the values are bit-identical); pa_bank_slice says which sequences. The
   * parts are then gathered into every rank's bank (the MPI module) and
   * pa_bank_set_stats records the whole cost. n_slices 0 or 1: everything. */
  int slice, n_slices;
  /* called after each batch with the sequences done so far (of this
   * slice's); may be NULL. Returning non-zero stops the computation:
   * pa_bank_compute then fails with PA_ECANCELED (a signal, a deadline). */
  int (*progress)(void *ctx, int done, int total);
  void *progress_ctx;
} pa_bank_opts;

/* What computing the bank cost (restored from the file for a loaded bank). */
typedef struct {
  long prefix_tokens;         /* the shared prefix, computed once */
  long continuation_tokens;   /* the sequences' tokens after it, summed */
  long naive_tokens;          /* the full sequences' lengths, summed: the cost without sharing */
  int min_tokens, max_tokens; /* shortest and longest sequence */
  int batch;
  double seconds; /* wall time of pa_bank_compute, tokenization included */
} pa_bank_stats;

typedef struct pa_bank pa_bank;

/* Computes the bank. lm, tok and tmpl are the model's (pa_model_tokenizer,
 * pa_model_chat). The letter must be one token after the prefix, both on its
 * own (as eval.c reads answers) and inside every rendered prompt; otherwise
 * PA_EUNSUPPORTED naming the letter and the prefix (and, inside a prompt,
 * the item). Sequences
 * longer than pa_lm_max_seq(lm) are PA_EINVAL. */
int pa_bank_compute(pa_lm *lm, const pa_tokenizer *tok, const pa_chat_template *tmpl, const pa_inventory *inv,
                    const pa_bank_opts *o, pa_bank **out);
void pa_bank_destroy(pa_bank *b); /* accepts NULL */

/* The bank as probe.h takes it; borrowed (valid while b lives). */
pa_pas_bank pa_bank_view(const pa_bank *b);
const float *pa_bank_data(const pa_bank *b);        /* [2 n_items][L][H][hd] */
const int *pa_bank_items(const pa_bank *b, int *n); /* item numbers in bank order */
const pa_bank_stats *pa_bank_stats_get(const pa_bank *b);
/* The sequences [*first, *first + *n) that a sliced pa_bank_compute filled
 * (all of them for an unsliced one); a sequence's values are
 * pa_bank_data(b) + seq * L * H * hd, 2 sequences (letters A, E) per item. */
void pa_bank_slice(const pa_bank *b, int *first, int *n);
/* The bank's data, writable: where gathered slices go. */
float *pa_bank_data_mut(pa_bank *b);
void pa_bank_set_stats(pa_bank *b, const pa_bank_stats *st);

/* ---- the key and the cache file ---------------------------------------- */

/* What a cached bank must have been made from. Strings are borrowed. */
typedef struct {
  char model[65];     /* pa_model_fingerprint: SHA-256 (hex) of the model's tensor data files */
  char inventory[65]; /* pa_bank_inventory_fingerprint */
  char tokens[65];    /* SHA-256 of every sequence's token ids (catches tokenizer and template changes) */
  const char *system; /* the prompt settings, resolved (no NULLs) */
  const char *prefix;
  bool lowercase;
  const char *template_name; /* pa_chat_template_name */
  const char *weights;       /* "fp32" or "bf16" (pa_bank_opts.weights) */
  int n_items, n_layers, n_heads, head_dim;
} pa_bank_key;

/* SHA-256 (64 lowercase hex digits) of the model's tensor data, streamed
 * from disk: for a GGUF file, the file (so it equals `sha256sum model.gguf`);
 * for a Hugging Face directory, the concatenation of every *.safetensors file
 * in it in byte-wise sorted name order (config.json and the tokenizer files
 * are not included; the key's token fingerprint covers the tokenizer).
 * PA_ENOTFOUND if the path or, for a directory, any .safetensors file is
 * missing; PA_EIO on read errors. About 1 s per GB. */
int pa_model_fingerprint(const char *model_path, char out[65]);

/* SHA-256 (hex) of the bank's items: for each train item in bank order, its
 * number in decimal, a tab, its text and a newline. */
int pa_bank_inventory_fingerprint(const pa_inventory *inv, char out[65]);

/* Fills a key for the model (its fingerprint, as pa_model_fingerprint gives
 * it, and its config), inventory and options (resolved as pa_bank_compute
 * resolves them). Tokenizes the prompts (milliseconds) for the token
 * fingerprint. key->system and key->prefix point into o or to static
 * defaults: keep o's strings alive while the key is used. */
int pa_bank_key_make(const char model_fingerprint[65], const pa_model_config *c, const pa_tokenizer *tok,
                     const pa_chat_template *tmpl, const pa_inventory *inv, const pa_bank_opts *o, pa_bank_key *key);

/* The cache file's name for a model fingerprint and weight format:
 * "bank-<16 hex>.bin" for fp32, "bank-<16 hex>-bf16.bin" for bf16 (a bank per
 * format, so that runs of either kind find their own). */
void pa_bank_file_name(const char model_fingerprint[65], const char *weights, char *buf, size_t n);

/* Writes the bank to path atomically (fileio.h). The key must describe the
 * bank: its inventory, token fingerprint, prompt settings and dimensions are
 * checked against those the bank was made with (PA_EINVAL naming what
 * differs); only the model fingerprint cannot be checked here. */
int pa_bank_save(const pa_bank *b, const char *path, const pa_bank_key *key);

/* Reads a bank saved under the same key. PA_ENOTFOUND if path does not exist
 * (compute it then). Anything else that keeps the file from being this key's
 * bank is an error naming the file and what is wrong: every key field that
 * differs (PA_EINVAL), a wrong magic, a truncated or corrupted file
 * (PA_EFORMAT), another format version (PA_EUNSUPPORTED). *out is NULL on
 * any error. */
int pa_bank_load(const char *path, const pa_bank_key *key, pa_bank **out);

/* pa_bank_load, and on PA_ENOTFOUND pa_bank_compute then pa_bank_save. Any
 * other load error is returned as it is: a stale or damaged cache is never
 * overwritten silently. *loaded (may be NULL) says which happened. */
int pa_bank_load_or_compute(const char *path, const pa_bank_key *key, pa_lm *lm, const pa_tokenizer *tok,
                            const pa_chat_template *tmpl, const pa_inventory *inv, const pa_bank_opts *o, pa_bank **out,
                            bool *loaded);

#endif
