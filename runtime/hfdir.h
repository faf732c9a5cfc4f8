/* hfdir.h: a Hugging Face model directory, as `save_pretrained` writes it.
 *
 *   config.json                       required; kept parsed for model.c to read
 *   model.safetensors                 the weights in one file, or
 *   model.safetensors.index.json      {"weight_map": {tensor: shard file}} plus
 *   model-00001-of-0000N.safetensors    the shards it names
 *   tokenizer.json                    required (only its path is kept here)
 *   tokenizer_config.json             optional: chat_template, bos/eos tokens
 *   chat_template.jinja               optional: the template when
 *                                     tokenizer_config.json has none
 *
 * Like transformers, a model.safetensors beside an index wins. With an index,
 * the directory's tensors are exactly those the weight_map lists, each taken
 * from the shard it names (a shard's unlisted tensors are ignored); every
 * shard listed is opened and validated at open. Shard names must be plain file
 * names in the directory ("../x", "a/b" are refused); symlinks (the Hugging
 * Face cache layout) are followed.
 *
 * Errors: 0 or a negative PA_E* code, with a message naming the directory or
 * file and the problem (status.h). A pa_hfdir is immutable after open and
 * safe to read from many threads; every pointer it returns stays valid until
 * pa_hfdir_close().
 */
#ifndef PALIGN_HFDIR_H
#define PALIGN_HFDIR_H

#include "safetensors.h"

#include <cJSON.h>

#include <stddef.h>

typedef struct pa_hfdir pa_hfdir;

/* Opens `dir` and validates all of the above. On failure *out is NULL. */
int pa_hfdir_open(const char *dir, pa_hfdir **out);
void pa_hfdir_close(pa_hfdir *h); /* accepts NULL */

const char *pa_hfdir_path(const pa_hfdir *h); /* the directory, without a trailing '/' */

/* config.json, parsed (a JSON object), and its path for messages. Read only:
 * never modify or free it. */
const cJSON *pa_hfdir_config(const pa_hfdir *h);
const char *pa_hfdir_config_path(const pa_hfdir *h);

/* The tensors of every shard together, in the order the index (or the single
 * file's header) lists them. t->file names the shard each came from. */
size_t pa_hfdir_n_tensors(const pa_hfdir *h);
const pa_st_tensor *pa_hfdir_tensor_at(const pa_hfdir *h, size_t i);           /* NULL past the end */
const pa_st_tensor *pa_hfdir_find_tensor(const pa_hfdir *h, const char *name); /* NULL if absent */
size_t pa_hfdir_n_shards(const pa_hfdir *h);                                   /* 1 for a single model.safetensors */

const char *pa_hfdir_tokenizer_json_path(const pa_hfdir *h);
const char *pa_hfdir_tokenizer_config_path(const pa_hfdir *h); /* NULL if absent */
const cJSON *pa_hfdir_tokenizer_config(const pa_hfdir *h);     /* NULL if absent; read only */

/* From tokenizer_config.json ("chat_template" as a string, or the "default"
 * entry of a list of {name, template}), else chat_template.jinja; NULL if
 * neither has one. */
const char *pa_hfdir_chat_template(const pa_hfdir *h);
/* "bos_token"/"eos_token" of tokenizer_config.json, written either as a string
 * or as {"content": ...}; NULL if absent or null. */
const char *pa_hfdir_bos_token(const pa_hfdir *h);
const char *pa_hfdir_eos_token(const pa_hfdir *h);


#endif
