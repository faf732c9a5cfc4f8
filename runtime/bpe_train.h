/* bpe_train.h: a small byte-level BPE trainer (GPT-2 style), for writing test
 * models with a real, self-consistent tokenizer (mkmodel.c).
 *
 * Training: the text is cut into pieces by pa_bpe_pretok_next() (GPT-2's
 * pre-tokenizer for ASCII text, with every digit a piece of its own, as
 * SmolLM2's Digits(individual_digits) + ByteLevel pre-tokenizers do); each
 * piece starts as its bytes; then, n_merges times, the adjacent pair that
 * occurs most often across the pieces (weighted by piece count) is merged
 * everywhere. Ties go to the pair whose left token, then right token, sorts
 * first by strcmp, so the result depends on nothing but the text and n_merges.
 *
 * Token strings are in GPT-2's byte-to-unicode form: each byte is a printable
 * code point (space is "Ġ", newline "Ċ"), UTF-8 encoded, so every token and
 * every "left right" merge line is printable and space-free.
 *
 * A pa_bpe_vocab is immutable after training and safe to read from many
 * threads. Errors: 0 or a negative PA_E* code with a message (status.h).
 */
#ifndef PALIGN_BPE_TRAIN_H
#define PALIGN_BPE_TRAIN_H

#include <stddef.h>
#include <stdint.h>

typedef struct pa_bpe_vocab pa_bpe_vocab;

/* Learns exactly n_merges merges from text[0..len). PA_EINVAL (with the
 * number reached) if the text runs out of pairs first. */
int pa_bpe_train(const char *text, size_t len, int32_t n_merges, pa_bpe_vocab **out);
void pa_bpe_vocab_destroy(pa_bpe_vocab *v); /* accepts NULL */

/* Tokens in id order: the 256 single bytes (token b is byte b), then each
 * distinct merge result in the order first learned. Two merges can produce
 * the same string ("ab"+"c" and "a"+"bc"), so n_tokens <= 256 + n_merges. */
size_t pa_bpe_vocab_n_tokens(const pa_bpe_vocab *v);
const char *pa_bpe_vocab_token(const pa_bpe_vocab *v, size_t i);
size_t pa_bpe_vocab_n_merges(const pa_bpe_vocab *v);
/* Merge i (rank i: lower ranks apply first) as "left right". */
const char *pa_bpe_vocab_merge(const pa_bpe_vocab *v, size_t i);

/* GPT-2's reversible byte-to-unicode map: writes the UTF-8 form of byte b's
 * code point (1 or 2 bytes) and a NUL to out; returns the length. */
size_t pa_bpe_byte_to_unicode(uint8_t b, char out[4]);

/* The end of the pre-tokenizer piece that starts at pos (< len). Bytes of
 * 0x80 and above count as letters: exact for ASCII text, which is what the
 * trainer is given. */
size_t pa_bpe_pretok_next(const char *text, size_t len, size_t pos);

#endif
