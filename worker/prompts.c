#include "prompts.h"

#include "status.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char *const labels[6] = {NULL,
                                      "Very Inaccurate",
                                      "Moderately Inaccurate",
                                      "Neither Accurate Nor Inaccurate",
                                      "Moderately Accurate",
                                      "Very Accurate"};

const char *pa_answer_label(int answer) { return answer >= 1 && answer <= 5 ? labels[answer] : NULL; }

char *pa_prompt_question(const pa_item *item, bool lowercase) {
  static const char *const fmt = "Given a statement of you: \"You %s.\"\n"
                                 "Please choose from the following options to identify how accurately this "
                                 "statement describes you.\n"
                                 "Options:\n(A). Very Accurate\n(B). Moderately Accurate\n"
                                 "(C). Neither Accurate Nor Inaccurate\n(D). Moderately Inaccurate\n"
                                 "(E). Very Inaccurate\n";
  char *text = strdup(item->text);
  if (!text) {
    pa_error(PA_ENOMEM, "no memory");
    return NULL;
  }
  if (lowercase)
    for (char *p = text; *p; p++)
      if (*p >= 'A' && *p <= 'Z')
        *p = (char)(*p - 'A' + 'a');
  const int n = snprintf(NULL, 0, fmt, text);
  char *out = malloc((size_t)n + 1);
  if (out)
    snprintf(out, (size_t)n + 1, fmt, text);
  else
    pa_error(PA_ENOMEM, "no memory");
  free(text);
  return out;
}

char *pa_prompt_icl(const pa_inventory *inv, const pa_subject *s) {
  int n_train;
  const int *train = pa_inventory_train(inv, &n_train);
  size_t cap = strlen(PA_ICL_HEAD) + 1;
  for (int i = 0; i < n_train; i++)
    cap += strlen(pa_inventory_item(inv, train[i])->text) + 40;
  char *out = malloc(cap);
  if (!out) {
    pa_error(PA_ENOMEM, "no memory");
    return NULL;
  }
  size_t len = (size_t)snprintf(out, cap, "%s", PA_ICL_HEAD);
  bool first = true;
  for (int i = 0; i < n_train; i++) {
    const int a = s->answers[train[i]];
    if (a == 0)
      continue; /* missing answers are left out */
    len += (size_t)snprintf(out + len, cap - len, "%s%s:%s", first ? "" : ";", pa_inventory_item(inv, train[i])->text,
                            pa_answer_label(a));
    first = false;
  }
  return out;
}
