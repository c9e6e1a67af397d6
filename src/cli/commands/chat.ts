/** `blip2 chat`: a conversation about one image, one question per line (a terminal or a pipe). */
import readline from "node:readline";
import { Blip2Error, describeError } from "../../errors.js";
import { languageModelPositions } from "../../generation/limits.js";
import { intOption, numberOption, UsageError, type Command } from "../command.js";
import { generationFromArgs, generationHelp, generationOptionSpec, loadModel, modelHelp, modelOptions } from "../shared.js";

const COMMANDS = "/reset forgets the conversation, /exit quits";

export const chat: Command = {
  name: "chat",
  summary: "chat about an image (type a question per line; /reset, /exit)",
  usage: "blip2 chat [--model M] [--context-window N] [--drop-to X] [generation options] IMAGE",
  help: [
    "--context-window N       tokens the language model may see (default 512, or the model's positions if fewer)",
    "--drop-to X              when old turns must go, drop them until X of the window is used (default 1)",
    ...generationHelp,
    ...modelHelp,
  ].join("\n"),
  options: { ...modelOptions, ...generationOptionSpec, "context-window": { type: "string" }, "drop-to": { type: "string" } },
  async run(args, io) {
    if (args.positionals.length !== 1) throw new UsageError("chat: give exactly one IMAGE");
    const generation = generationFromArgs(args);
    const contextWindow = intOption(args, "context-window", 8);
    const dropTo = numberOption(args, "drop-to", (x) => x > 0 && x <= 1, "a share of the window in (0, 1]");
    const interactive = io.stdin.isTTY === true;
    const { blip2 } = await loadModel(args, io, generation);
    let answered = 0;
    let failed = 0;
    try {
      const positions = languageModelPositions(blip2.model.config);
      if (contextWindow !== undefined && contextWindow > positions) {
        throw new UsageError(`invalid value for --context-window: this language model takes at most ${positions} positions, got ${contextWindow}`);
      }
      const conversation = await blip2.chat(args.positionals[0]!, {
        contextWindow,
        dropTo,
        onDrop: (n) => io.stderr.write(`(left out the ${n} oldest turn${n > 1 ? "s" : ""} to stay within the context window)\n`),
      });
      const lines = readline.createInterface({ input: io.stdin, output: interactive ? io.stdout : undefined, terminal: interactive });
      if (interactive) io.stdout.write(`Ask about the image. ${COMMANDS}.\n> `);
      for await (const raw of lines) {
        const line = raw.trim();
        const command = /^\/[A-Za-z-]*(\s|$)/.test(line) ? line.split(/\s/)[0]!.toLowerCase() : null;
        if (command === "/exit" || command === "/quit") break;
        if (command === "/reset") {
          conversation.reset();
          io.stdout.write("(conversation reset)\n");
        } else if (command !== null) {
          io.stderr.write(`blip2: unknown command ${line.split(/\s/)[0]} (${COMMANDS}); questions cannot start with one\n`);
        } else if (line) {
          try {
            io.stdout.write(`${(await conversation.ask(line, generation)).answer}\n`);
            answered++;
          } catch (err) {
            // A question that cannot fit is reported, and the conversation goes on.
            if (!(err instanceof Blip2Error)) throw err;
            io.stderr.write(`blip2: error: ${describeError(err)}\n`);
            failed++;
          }
        }
        if (interactive) io.stdout.write("> ");
      }
      lines.close();
    } finally {
      await blip2.dispose();
    }
    // Some questions answered: the conversation worked, its failures were each reported. None: it did not.
    return failed > 0 && answered === 0 ? 1 : 0;
  },
};
