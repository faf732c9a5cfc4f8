/* commands.h: the subcommands of the `palign` user CLI.
 * Each takes argv with argv[0] = the subcommand's name and returns the process
 * exit status: 0 success, 1 failure (the message already printed), 2 usage. */
#ifndef PALIGN_COMMANDS_H
#define PALIGN_COMMANDS_H

int cmd_inspect(int argc, char **argv);
int cmd_tokenize(int argc, char **argv);
int cmd_mkmodel(int argc, char **argv);
int cmd_generate(int argc, char **argv);
int cmd_eval(int argc, char **argv);
int cmd_query(int argc, char **argv);

#endif
