/* chat.h: the chat formats of Llama-family models, rendered to the exact
 * text their Jinja chat templates produce for one exchange: an optional
 * system message, one user message, and an assistant turn left open.
 *
 * palign does not run Jinja. A model's template is recognised by its markers
 * and rendered by code written for that format; tests/golden compares the
 * result with the real templates rendered by Python's jinja2. Formats:
 *   chatml    <|im_start|>system\n{S}<|im_end|>\n<|im_start|>user\n{U}<|im_end|>\n<|im_start|>assistant\n{P}
 *             (SmolLM2; a system line the template inserts by itself, such as
 *             SmolLM2's "You are a helpful AI assistant named SmolLM, ...",
 *             is its default system message)
 *   llama3    <|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n{S}<|eot_id|>
 *             <|start_header_id|>user<|end_header_id|>\n\n{U}<|eot_id|>
 *             <|start_header_id|>assistant<|end_header_id|>\n\n{P}     (S, U, P trimmed)
 *   llama3.1  the same with "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"
 *             opening the system message, which is always present
 *   llama2    <s>[INST] <<SYS>>\n{S}\n<</SYS>>\n\n{U} [/INST] {P}     (Meta's template)
 *   mistral   <s>[INST] {S}\n\n{U} [/INST]{P}   (Mistral-Instruct v0.1/v0.2; those templates
 *             have no system role, so the system message opens the user message)
 * The rendered text contains the format's special tokens as text (BOS
 * included where the template writes it): tokenize it with
 * PA_TOK_PARSE_SPECIAL and without PA_TOK_ADD_SPECIAL.
 *
 * The assistant turn: with no prefix, the template's generation prompt; with
 * a prefix, the template's rendering of an assistant message holding the
 * prefix, cut before its end-of-turn marker (so a template that trims
 * messages trims the prefix too, as the reference code's token slicing does).
 *
 * Errors: 0 or a negative PA_E* code with a message (status.h). A template
 * is immutable once made and safe to share between threads.
 */
#ifndef PALIGN_CHAT_H
#define PALIGN_CHAT_H

#include <stddef.h>
#include <stdint.h>

typedef struct pa_chat_template pa_chat_template;

typedef enum {
  PA_CHAT_CHATML = 0,
  PA_CHAT_LLAMA3 = 1,
  PA_CHAT_LLAMA31 = 2,
  PA_CHAT_LLAMA2 = 3,
  PA_CHAT_MISTRAL = 4,
} pa_chat_kind;

/* Picks the format from a model's Jinja template by its markers. With no
 * template (NULL or empty), from the architecture: "mistral" gives mistral,
 * anything else llama2, the format the paper's reference code uses for
 * models without a Llama-3 template. A template with none of the known
 * markers is PA_EUNSUPPORTED, with a message naming the --template choices. */
int pa_chat_template_from_jinja(const char *jinja_or_NULL, const char *arch, pa_chat_template **out);

/* By name: "chatml", "llama3", "llama3.1", "llama2", "mistral" (PA_EINVAL
 * otherwise). A named chatml template has no default system message. */
int pa_chat_template_from_name(const char *name, pa_chat_template **out);

void pa_chat_template_destroy(pa_chat_template *t); /* accepts NULL */

pa_chat_kind pa_chat_template_kind(const pa_chat_template *t);
const char *pa_chat_template_name(const pa_chat_template *t); /* "chatml", ... */
/* The system message used when none is given, or NULL (then the prompt has
 * no system part, except llama3.1's, which is always there). */
const char *pa_chat_template_default_system(const pa_chat_template *t);
/* The text that ends a turn ("<|im_end|>", "<|eot_id|>", "</s>"): the stop
 * token to look for when generating. */
const char *pa_chat_template_end_of_turn(const pa_chat_template *t);

/* Renders one exchange into *out (malloc'd, NUL-terminated; the caller frees
 * it). system: NULL for the template's default behaviour, "" for an empty
 * system message; user: required; assistant_prefix: NULL or "" for the
 * generation prompt, else the start of the assistant's answer. */
int pa_chat_render(const pa_chat_template *t, const char *system, const char *user, const char *assistant_prefix,
                   char **out);

struct pa_tokenizer;

/* Renders one exchange (as pa_chat_render) and tokenizes it with special
 * tokens parsed: the token ids the model sees. *ids is malloc'd. */
int pa_chat_tokenize(const pa_chat_template *t, const struct pa_tokenizer *tok, const char *system, const char *user,
                     const char *assistant_prefix, int32_t **ids, size_t *n);

#endif
