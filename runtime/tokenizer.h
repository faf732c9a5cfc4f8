/* tokenizer.h: text to token ids and back, for Llama-family models.
 *
 * Two tokenizer families, read from a GGUF file or a Hugging Face
 * tokenizer.json (see docs/TOKENIZER.md for the exact behaviour):
 *   - byte-level BPE (GPT-2, Llama-3, SmolLM2): the text is cut into pieces by
 *     the model's pre-tokenizer regexes (PCRE2), each piece's bytes become
 *     GPT-2's printable byte symbols, and merges apply in rank order;
 *   - SentencePiece-style BPE (Llama-2, Mistral): spaces become U+2581 "▁",
 *     a "▁" may be prepended, symbols are UTF-8 characters, merges apply by
 *     token score (GGUF "llama") or merge rank (tokenizer.json), and a
 *     character outside the vocabulary becomes its <0xNN> byte tokens.
 *
 * Text is UTF-8 but need not be valid: a byte that is not part of a valid
 * UTF-8 sequence is a piece of its own and becomes its byte token, so decode
 * gives the same bytes back.
 *
 * Errors: 0 or a negative PA_E* code with a message (status.h) that names the
 * file and the problem. Ownership: out-parameters that are arrays or strings
 * are malloc'd and owned by the caller (free()). Thread safety: a finished
 * pa_tokenizer is immutable; any number of threads may encode and decode with
 * it at once (each call allocates its own scratch). The builder functions at
 * the end are for one thread, before the tokenizer is shared.
 */
#ifndef PALIGN_TOKENIZER_H
#define PALIGN_TOKENIZER_H

#include "gguf.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef struct pa_tokenizer pa_tokenizer;

/* The numbering of GGUF's tokenizer.ggml.token_type (llama.cpp's). */
typedef enum {
  PA_TOKEN_UNDEFINED = 0,
  PA_TOKEN_NORMAL = 1,
  PA_TOKEN_UNKNOWN = 2,      /* the <unk> token */
  PA_TOKEN_CONTROL = 3,      /* special: <s>, <|im_start|>, <|eot_id|>, ... */
  PA_TOKEN_USER_DEFINED = 4, /* added text, matched in any input as itself */
  PA_TOKEN_UNUSED = 5,
  PA_TOKEN_BYTE = 6, /* <0xNN> byte-fallback tokens */
} pa_token_type;

typedef enum {
  PA_TOK_BYTE_BPE = 0, /* byte symbols, merges by rank (GGUF "gpt2", tokenizer.json ByteLevel) */
  PA_TOK_BPE = 1,      /* UTF-8 character symbols, merges by rank, byte fallback (tokenizer.json) */
  PA_TOK_SPM = 2,      /* UTF-8 character symbols, merges by score, byte fallback (GGUF "llama") */
} pa_tokenizer_model;

/* ---- loading ------------------------------------------------------------ */

/* From the tokenizer.ggml.* keys of a GGUF file: model ("gpt2" or "llama"),
 * pre (the pre-tokenizer of a "gpt2" model: "smollm", "llama-bpe", "gpt2",
 * "default", ... see docs/TOKENIZER.md), tokens, token_type, scores (required
 * for "llama"), merges (required for "gpt2"), bos/eos/unknown/padding/eot
 * token ids, add_bos_token, add_eos_token, add_space_prefix. The tokenizer
 * copies what it needs; g may be closed afterwards. */
int pa_tokenizer_from_gguf(const pa_gguf *g, pa_tokenizer **out);

/* From a Hugging Face tokenizer.json (model BPE; normalizer, pre_tokenizer
 * and added_tokens as docs/TOKENIZER.md lists) and, if not NULL, its
 * tokenizer_config.json (bos/eos/unk/pad tokens, add_bos_token,
 * add_eos_token). Anything the file asks for that palign does not implement
 * is refused with PA_EUNSUPPORTED rather than approximated. */
int pa_tokenizer_from_json(const char *tokenizer_json, const char *tokenizer_config_json_or_NULL, pa_tokenizer **out);

void pa_tokenizer_destroy(pa_tokenizer *t); /* accepts NULL */

/* ---- encoding and decoding ---------------------------------------------- */

enum {
  /* Text equal to a special (control) token, such as "<|im_start|>", becomes
   * that token; without this flag it is tokenized as ordinary text. Rendered
   * chat templates need it. User-defined added tokens are always matched. */
  PA_TOK_PARSE_SPECIAL = 1u << 0,
  /* Add BOS / EOS where the model's metadata asks for them (add_bos_token,
   * add_eos_token). A rendered chat template already holds its BOS. */
  PA_TOK_ADD_SPECIAL = 1u << 1,
};

/* Encodes text[0..len) (len bytes, NULs allowed; text may be NULL when len
 * is 0). *ids (malloc'd, never NULL on success even when *n_ids is 0)
 * receives the ids. Errors only for lack of memory or a regex engine failure
 * (PCRE2's match limits), never for the content of the text. */
int pa_tokenizer_encode(const pa_tokenizer *t, const char *text, size_t len, unsigned flags, int32_t **ids,
                        size_t *n_ids);

enum {
  /* Write control and unknown tokens as their text ("<|im_end|>"); by
   * default they are left out, as a model's reply is read. */
  PA_TOK_DECODE_SPECIAL = 1u << 0,
  /* Remove the one space the encoder put in front of SentencePiece-style
   * text (when the output starts with a space): decode(encode(x)) == x.
   * Leave it unset when decoding a continuation such as generated tokens. */
  PA_TOK_DECODE_STRIP_SPACE = 1u << 1,
};

/* The bytes ids[0..n) stand for, NUL-terminated (*len excludes the NUL; the
 * bytes may hold NULs). PA_EINVAL for an id outside 0..n_vocab-1. */
int pa_tokenizer_decode(const pa_tokenizer *t, const int32_t *ids, size_t n, unsigned flags, char **text, size_t *len);

/* ---- the vocabulary ----------------------------------------------------- */

int32_t pa_tokenizer_n_vocab(const pa_tokenizer *t);
pa_tokenizer_model pa_tokenizer_model_kind(const pa_tokenizer *t);
/* A short description for people: "byte-level BPE, pre-tokenizer smollm". */
const char *pa_tokenizer_describe(const pa_tokenizer *t);

/* The token as the vocabulary writes it ("Ġthe", "▁the", "<0x0A>",
 * "<|im_end|>"), not NUL-terminated; *len gets its length. NULL when id is
 * out of range. Valid while t lives. */
const char *pa_tokenizer_piece(const pa_tokenizer *t, int32_t id, size_t *len);
/* The bytes the token decodes to (" the", "\n", "<|im_end|>"), not
 * NUL-terminated; NULL when id is out of range. Valid while t lives. */
const char *pa_tokenizer_token_bytes(const pa_tokenizer *t, int32_t id, size_t *len);

/* The id of the token whose vocabulary text (as pa_tokenizer_piece gives
 * it) is exactly text, or -1. For a byte-level vocabulary " A" is "ĠA". */
int32_t pa_tokenizer_find(const pa_tokenizer *t, const char *text);

pa_token_type pa_tokenizer_token_type(const pa_tokenizer *t, int32_t id); /* UNDEFINED out of range */
/* Control and unknown tokens, and added tokens marked special: what
 * PA_TOK_PARSE_SPECIAL governs and PA_TOK_DECODE_SPECIAL shows. */
bool pa_tokenizer_is_special(const pa_tokenizer *t, int32_t id);

/* Special ids, -1 when the model has none. When the file names no
 * end-of-turn token, it is the first control token among <|eot_id|>,
 * <|im_end|>, <|end|> and <end_of_turn> (as llama.cpp guesses it). */
int32_t pa_tokenizer_bos(const pa_tokenizer *t);
int32_t pa_tokenizer_eos(const pa_tokenizer *t);
/* The token encoding writes for a piece the vocabulary lacks: as the
 * references encode, so -1 (the piece is dropped) for a GGUF byte-level BPE
 * (llama.cpp never writes its unknown_token_id there) and for a
 * tokenizer.json whose model names no unk_token (tokenizer_config.json's
 * unk_token does not change Hugging Face's encoding). */
int32_t pa_tokenizer_unk(const pa_tokenizer *t);
int32_t pa_tokenizer_pad(const pa_tokenizer *t);
int32_t pa_tokenizer_eot(const pa_tokenizer *t); /* end of turn, e.g. Llama-3's <|eot_id|> */
bool pa_tokenizer_add_bos(const pa_tokenizer *t);
bool pa_tokenizer_add_eos(const pa_tokenizer *t);

/* ---- building a tokenizer ----------------------------------------------
 * What the two loaders above share; also usable to write small tokenizers in
 * tests. Create, add tokens (ids in order of addition), merges, normalizer
 * and pre-tokenizer steps, set the options, then finish; on any error the
 * caller still destroys the half-built tokenizer. `source` (a file name)
 * prefixes every message. */

typedef enum {
  PA_SPLIT_ISOLATED = 0,             /* every match and every gap its own piece */
  PA_SPLIT_REMOVED = 1,              /* matches dropped */
  PA_SPLIT_MERGED_WITH_PREVIOUS = 2, /* a match joins the piece before it */
  PA_SPLIT_MERGED_WITH_NEXT = 3,     /* a match joins the piece after it */
  PA_SPLIT_CONTIGUOUS = 4,           /* adjacent matches form one piece */
} pa_split_behavior;

typedef enum {
  PA_PREFIX_NONE = 0,
  PA_PREFIX_EACH = 1,   /* a space before every text fragment (llama.cpp's add_space_prefix) */
  PA_PREFIX_FIRST = 2,  /* Metaspace "first": before the text at offset 0, unless it starts with a space */
  PA_PREFIX_ALWAYS = 3, /* Metaspace "always": before every fragment that does not start with a space */
} pa_space_prefix;

typedef struct {
  int32_t bos, eos, pad, eot; /* -1: none */
  int32_t unk; /* written for a piece the vocabulary lacks (after byte fallback); -1: the piece is dropped */
  bool add_bos, add_eos;
  bool ignore_merges; /* a piece that is itself a token is not merged (Llama-3) */
  bool byte_fallback; /* PA_TOK_BPE: unknown characters become <0xNN> tokens */
  /* PA_TOK_BYTE_BPE, unk -1: a byte with no token is dropped after the
   * merges, keeping its neighbours apart (llama.cpp), not before them
   * (Hugging Face, where "!\x04!" merges into "!!") */
  bool drop_after_merges;
  bool fuse_unk;      /* PA_TOK_BPE: consecutive unknowns become one <unk> */
  bool space_to_meta; /* spaces become "▁" before the model sees the text */
  pa_space_prefix prefix;
  bool unique_texts;    /* two tokens with one text are an error; otherwise the later id wins */
  const char *describe; /* copied; NULL for a default */
} pa_tokenizer_opts;

int pa_tokenizer_build_new(pa_tokenizer_model model, const char *source, pa_tokenizer **out);
/* Adds the next id. Texts may hold any bytes, but not be empty. */
int pa_tokenizer_build_token(pa_tokenizer *t, const char *text, size_t len, float score, pa_token_type type);
/* Makes id an added token, matched in the text before the model sees it:
 * `special` ones (type set to control, or left unknown) only with
 * PA_TOK_PARSE_SPECIAL, the others (type set to user-defined) always;
 * lstrip/rstrip swallow the whitespace before/after it (Hugging Face's
 * AddedToken flags). Tokens added with a control, unknown or user-defined
 * type are added tokens already, without lstrip/rstrip. */
int pa_tokenizer_build_added(pa_tokenizer *t, int32_t id, bool special, bool lstrip, bool rstrip);
/* The next merge rank: left and right, joined, must all be tokens (checked
 * by finish). */
int pa_tokenizer_build_merge(pa_tokenizer *t, const char *left, size_t llen, const char *right, size_t rlen);
/* Normalizer steps, applied in order to each text fragment: prepend `s` to
 * a non-empty fragment, or replace every `from` by `to`. */
int pa_tokenizer_build_prepend(pa_tokenizer *t, const char *s);
int pa_tokenizer_build_replace(pa_tokenizer *t, const char *from, const char *to);
/* Unicode NFC (canonical composition, utf8proc), as Hugging Face's NFC
 * normalizer (Qwen2's tokenizer.json); bytes that are not valid UTF-8 pass
 * through unchanged. */
int pa_tokenizer_build_nfc(pa_tokenizer *t);
/* Pre-tokenizer steps, applied in order to every piece: split by a PCRE2
 * regex (Hugging Face / Oniguruma syntax; \s and \S mean Unicode White_Space
 * as there). */
int pa_tokenizer_build_split(pa_tokenizer *t, const char *regex, pa_split_behavior b, bool invert);
/* Validates everything and builds the indexes; the tokenizer is then ready. */
int pa_tokenizer_build_finish(pa_tokenizer *t, const pa_tokenizer_opts *o);

#endif
