/**
 * Errors of the HTTP API: each has a status and a stable `code` that clients can branch on; the
 * body is `{ "error": { "code", "message" } }` (the shape OpenAI's clients read), never a stack.
 */
import { Blip2Error } from "../errors.js";

export class HttpError extends Blip2Error {
  constructor(
    readonly status: number,
    readonly code: string,
    message: string,
    /** Extra response headers (Retry-After on 429). */
    readonly headers: Record<string, string> = {},
  ) {
    super(message);
    this.name = "HttpError";
  }
}

export interface ErrorBody {
  error: { code: string; message: string; type: string };
}

/** OpenAI's `type` for a status, so that its clients raise their usual exception classes. */
function typeOf(status: number): string {
  if (status === 401) return "authentication_error";
  if (status === 404) return "not_found_error";
  if (status === 429) return "rate_limit_error";
  return status >= 500 ? "server_error" : "invalid_request_error";
}

export function errorBody(status: number, code: string, message: string): ErrorBody {
  return { error: { code, message, type: typeOf(status) } };
}

/** Fastify's own error codes (parsing, limits) as ours. */
const FASTIFY_CODES: Record<string, [number, string]> = {
  FST_ERR_CTP_INVALID_JSON_BODY: [400, "invalid_json"],
  FST_ERR_CTP_EMPTY_JSON_BODY: [400, "invalid_json"],
  FST_ERR_CTP_BODY_TOO_LARGE: [413, "body_too_large"],
  FST_REQ_FILE_TOO_LARGE: [413, "body_too_large"],
  FST_PARTS_LIMIT: [413, "body_too_large"],
  FST_FILES_LIMIT: [413, "body_too_large"],
  FST_FIELDS_LIMIT: [413, "body_too_large"],
  FST_ERR_CTP_INVALID_MEDIA_TYPE: [415, "unsupported_media_type"],
  FST_INVALID_MULTIPART_CONTENT_TYPE: [415, "unsupported_media_type"],
  FST_ERR_CTP_INVALID_CONTENT_LENGTH: [400, "invalid_request"],
};

/**
 * Any thrown value as [status, body]. A Blip2Error is the client's input (a bad image, a prompt
 * too long); anything else is ours, reported without its details.
 */
export function toErrorResponse(err: unknown): [number, ErrorBody] {
  if (err instanceof HttpError) return [err.status, errorBody(err.status, err.code, err.message)];
  const e = err as { code?: string; statusCode?: number; validation?: unknown; message?: string };
  if (e?.validation) return [400, errorBody(400, "invalid_request", e.message ?? "invalid request")];
  const known = e?.code ? FASTIFY_CODES[e.code] : undefined;
  if (known) return [known[0], errorBody(known[0], known[1], firstLine(e.message))];
  if (err instanceof SyntaxError) return [400, errorBody(400, "invalid_json", firstLine(err.message))];
  if (err instanceof Blip2Error) return [400, errorBody(400, "invalid_input", firstLine(err.message))];
  if (typeof e?.statusCode === "number" && e.statusCode >= 400 && e.statusCode < 500) {
    return [e.statusCode, errorBody(e.statusCode, "invalid_request", firstLine(e.message))];
  }
  return [500, errorBody(500, "internal_error", "internal error (the server's log has the details)")];
}

function firstLine(message: string | undefined): string {
  return (message ?? "").split("\n")[0]!;
}
