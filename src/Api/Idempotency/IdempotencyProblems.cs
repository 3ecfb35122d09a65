using System.Globalization;
using System.Text.Json;
using Microsoft.Extensions.Options;

namespace OrleansIdempotency.AspNetCore;

/// <summary>One kind of error the layer answers with, and its RFC 9457 problem type (see <c>docs/problems.md</c>).</summary>
/// <param name="Name">The last segment of the problem's <c>type</c> URI.</param>
/// <param name="Status">The HTTP status.</param>
/// <param name="Title">The short, fixed summary.</param>
/// <param name="Retryable">Whether sending the same request again under the same key may succeed.</param>
public sealed record IdempotencyProblem(string Name, int Status, string Title, bool Retryable)
{
    /// <summary>No <c>Idempotency-Key</c> on an endpoint that requires one.</summary>
    public static readonly IdempotencyProblem KeyMissing = new("key-missing", 400, "Idempotency-Key header missing", false);

    /// <summary>The <c>Idempotency-Key</c> is not one valid key.</summary>
    public static readonly IdempotencyProblem KeyInvalid = new("key-invalid", 400, "Idempotency-Key header invalid", false);

    /// <summary>The key was used for a different request (method, route, query or body).</summary>
    public static readonly IdempotencyProblem KeyReused = new("key-reused", 422, "Idempotency-Key reused for a different request", false);

    /// <summary>The first request with this key is still running.</summary>
    public static readonly IdempotencyProblem InProgress = new("request-in-progress", 409, "A request with this Idempotency-Key is in progress", true);

    /// <summary>An earlier attempt's lease ran out without a completion: it may or may not have run.</summary>
    public static readonly IdempotencyProblem OutcomeUnknown = new("outcome-unknown", 409, "The outcome of the request with this Idempotency-Key is unknown", false);

    /// <summary>The request completed, but its response was larger than the storage cap.</summary>
    public static readonly IdempotencyProblem ResponseNotStored = new("response-not-stored", 409, "The response to this Idempotency-Key was too large to store", false);

    /// <summary>The request body is larger than the layer fingerprints.</summary>
    public static readonly IdempotencyProblem BodyTooLarge = new("body-too-large", 413, "Request body too large", false);

    /// <summary>
    /// The server refused the request body while the layer read it (malformed chunking, too slow, over the server's
    /// limit, cut off): Kestrel's verdict, with its status (400, 408, 413). Only a body that came too slowly may do
    /// better when sent again.
    /// </summary>
    public static IdempotencyProblem BodyUnreadable(int status) =>
        new("body-unreadable", status, "Request body could not be read", status == StatusCodes.Status408RequestTimeout);

    /// <summary>The endpoint requires a scope (an authenticated caller) and the request has none.</summary>
    public static readonly IdempotencyProblem ScopeRequired = new("scope-required", 401, "Authentication required for idempotent requests", false);

    /// <summary>
    /// The caller authenticated, but as no one the endpoint's scope can read (a principal without the claim it reads):
    /// it is not let share keys with every such caller. Logging in again changes nothing; the server's scope must.
    /// </summary>
    public static readonly IdempotencyProblem ScopeUnreadable = new("scope-unreadable", 403, "The caller's identity does not scope idempotency keys here", false);

    /// <summary>A Once API call's token is not the key's live claim: another claim holds the key, or it completed or is in doubt.</summary>
    public static readonly IdempotencyProblem ClaimNotHeld = new("claim-not-held", 409, "The claim is not held", false);

    /// <summary>An operator asked to resolve a key whose outcome is not in doubt.</summary>
    public static readonly IdempotencyProblem KeyNotInDoubt = new("key-not-in-doubt", 409, "The key's outcome is not in doubt", false);

    /// <summary>An operator named the claim they decided about, and the key is now in doubt for another.</summary>
    public static readonly IdempotencyProblem KeyChanged = new("key-changed", 409, "The key changed since it was read", false);

    /// <summary>A Once API or operator call's key, token or body is malformed.</summary>
    public static readonly IdempotencyProblem RequestInvalid = new("request-invalid", 400, "Request invalid", false);

    /// <summary>The store or the cluster cannot be reached: nothing ran.</summary>
    public static readonly IdempotencyProblem Unavailable = new("store-unavailable", 503, "Idempotency store unavailable", true);
}

/// <summary>Writes <see cref="IdempotencyProblem"/>s as <c>application/problem+json</c>.</summary>
internal sealed partial class IdempotencyProblems(IOptions<IdempotencyOptions> options, ILogger<IdempotencyProblems> logger)
{
    private static readonly JsonWriterOptions WriterOptions = new() { Indented = false };

    /// <summary>The documentation of the <c>Idempotency-Key</c> header, sent as <c>Link: &lt;…&gt;; rel="describedby"</c>.</summary>
    public Uri KeyDocumentation => new(options.Value.ProblemTypeBase, "idempotency-key");

    /// <summary>
    /// Answers 503 <c>store-unavailable</c>, with <c>Retry-After</c>: nothing was decided. Logged here, once per answer,
    /// whichever surface gives it.
    /// </summary>
    public Task WriteUnavailableAsync(HttpContext context, IdempotencyUnavailableException exception, string? key, string? detail = null)
    {
        LogLines.TryWrite(logger, exception, static (log, ex) => LogUnavailable(log, ex, ex.Key));
        return WriteAsync(context, IdempotencyProblem.Unavailable,
            detail ?? $"The idempotency store could not be reached ({exception.InnerException?.GetType().Name}); nothing was decided.", key, TimeSpan.FromSeconds(1));
    }

    /// <summary>The problem <see cref="WriteAsync"/> answered <paramref name="context"/> with, if any.</summary>
    public static IdempotencyProblem? AnsweredWith(HttpContext context) => context.Items.TryGetValue(typeof(IdempotencyProblem), out var problem) ? (IdempotencyProblem?)problem : null;

    public async Task WriteAsync(HttpContext context, IdempotencyProblem problem, string detail, string? key, TimeSpan? retryAfter = null)
    {
        context.Items[typeof(IdempotencyProblem)] = problem;
        var response = context.Response;
        response.StatusCode = problem.Status;
        response.ContentType = "application/problem+json";
        if (retryAfter is { } delay)
        {
            response.Headers.RetryAfter = Math.Max(1, (int)Math.Ceiling(delay.TotalSeconds)).ToString(CultureInfo.InvariantCulture);
        }

        if (problem == IdempotencyProblem.KeyMissing || problem == IdempotencyProblem.KeyInvalid)
        {
            response.Headers.Link = $"<{KeyDocumentation}>; rel=\"describedby\"";
        }

        await using var writer = new Utf8JsonWriter(response.Body, WriterOptions);
        writer.WriteStartObject();
        writer.WriteString("type", new Uri(options.Value.ProblemTypeBase, problem.Name).ToString());
        writer.WriteString("title", problem.Title);
        writer.WriteNumber("status", problem.Status);
        writer.WriteString("detail", detail);
        writer.WriteString("instance", context.Request.PathBase.Add(context.Request.Path).ToUriComponent());
        if (key is null)
        {
            writer.WriteNull("idempotencyKey");
        }
        else
        {
            writer.WriteString("idempotencyKey", key);
        }

        writer.WriteBoolean("retryable", problem.Retryable);
        writer.WriteString("traceId", context.TraceIdentifier);
        writer.WriteEndObject();
    }

    [LoggerMessage(Level = LogLevel.Warning, Message = "Idempotency key {Key}: the store or the cluster did not answer; answered 503 store-unavailable.")]
    private static partial void LogUnavailable(ILogger logger, Exception exception, string key);
}
