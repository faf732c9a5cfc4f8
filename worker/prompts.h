/* prompts.h: the texts the model is shown (PAS.md, "Prompts").
 *
 * All strings are malloc'd and owned by the caller; NULL means out of
 * memory (pa_error has the message). */
#ifndef PALIGN_PROMPTS_H
#define PALIGN_PROMPTS_H

#include "inventory.h"

#include <stdbool.h>

#define PA_DEFAULT_SYSTEM "You are a helpful, honest and concise assistant."
#define PA_ICL_HEAD "Here are some of your behaviors and your level of recognition towards them;"

/* "Very Accurate" for 5 ... "Very Inaccurate" for 1; NULL otherwise. */
const char *pa_answer_label(int answer);

/* The item question: `Given a statement of you: "You {text}."`, the
 * instruction and the five options, each line ending in a newline. With
 * `lowercase` the item text is lowercased (ASCII), as the reference code
 * does when answering (not when building the activation bank). */
char *pa_prompt_question(const pa_item *item, bool lowercase);

/* The ICL system prompt: PA_ICL_HEAD followed by `{text}:{label}` for each of
 * the subject's train items with a known answer, in split order, joined by
 * ';'. */
char *pa_prompt_icl(const pa_inventory *inv, const pa_subject *s);

#endif
