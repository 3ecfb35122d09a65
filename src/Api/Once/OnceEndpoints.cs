using System.Buffers;
using System.Text.Json;
using System.Text.Json.Serialization;
using System.Text.RegularExpressions;
using Microsoft.AspNetCore.Http.Features;
using Microsoft.Extensions.Options;
using OrleansIdempotency.AspNetCore;
using OrleansIdempotency.Grains;

namespace OrleansIdempotency.Once;

/// <summary>
/// The Once API over HTTP/JSON (DESIGN §5), for workers and agents in any language: claim a key, complete it with a
/// JSON result, renew or release the claim, read the key. Keys belong to the caller's scope (the default policy's
/// <see cref="IdempotencyPolicy.Scope"/>), apart from the keys of idempotent endpoints. See the README.
/// </summary>
public static partial class OnceEndpoints
{
    /// <summary>Maps <c>POST {prefix}/{key}/claim|complete|renew|release</c> and <c>GET {prefix}/{key}</c>.</summary>
    public static RouteGroupBuilder MapOnce(this IEndpointRouteBuilder endpoints, string prefix = "/once")
    {
        var group = endpoints.MapGroup(prefix);
        group.MapPost("/{key}/claim", (HttpContext context, string key, OnceHttp once) => once.ClaimAsync(context, key))
            .AddEndpointFilter(Counted(OnceOperations.Claim, OnceResults.Acquired)).AddEndpointFilter(KeyAsSentAsync);
        group.MapPost("/{key}/complete", (HttpContext context, string key, OnceHttp once) => once.CompleteAsync(context, key))
            .AddEndpointFilter(Counted(OnceOperations.Complete, OnceResults.Completed)).AddEndpointFilter(KeyAsSentAsync);
        group.MapPost("/{key}/renew", (HttpContext context, string key, OnceHttp once) => once.RenewAsync(context, key))
            .AddEndpointFilter(Counted(OnceOperations.Renew, OnceResults.Renewed)).AddEndpointFilter(KeyAsSentAsync);
        group.MapPost("/{key}/release", (HttpContext context, string key, OnceHttp once) => once.ReleaseAsync(context, key))
            .AddEndpointFilter(Counted(OnceOperations.Release, OnceResults.Released)).AddEndpointFilter(KeyAsSentAsync);
        group.MapGet("/{key}", (HttpContext context, string key, OnceHttp once) => once.ReadAsync(context, key))
            .AddEndpointFilter(Counted(OnceOperations.Read, OnceResults.Read)).AddEndpointFilter(KeyAsSentAsync);
        return group;
    }

    // Each call counted once, by how it ended: the problem it answered, the caller gone before an answer, or the
    // operation's success (a claim's 200 is a completed key's result, replayed).
    private static Func<EndpointFilterInvocationContext, EndpointFilterDelegate, ValueTask<object?>> Counted(string operation, string success) =>
        async (invocation, next) =>
        {
            var context = invocation.HttpContext;
            var metrics = context.RequestServices.GetRequiredService<IdempotencyMetrics>();
            try
            {
                var answer = await next(invocation);
                metrics.RecordOnce(operation, ResultOf(context, operation, success));
                return answer;
            }
            catch (Exception)
            {
                metrics.RecordOnce(operation, IdempotencyMiddleware.ClientLeft(context) ? OnceResults.Abandoned : OnceResults.Failed);
                throw;
            }
        };

    private static string ResultOf(HttpContext context, string operation, string success)
    {
        if (IdempotencyProblems.AnsweredWith(context) is { } problem)
        {
            return problem.Name;
        }

        var status = context.Response.StatusCode;
        if (status == StatusCodes.Status200OK && !context.Response.HasStarted && IdempotencyMiddleware.ClientLeft(context))
        {
            // Left unanswered: the caller went away before anything was written.
            return OnceResults.Abandoned;
        }

        return operation == OnceOperations.Claim && status == StatusCodes.Status200OK ? OnceResults.Replayed : success;
    }

    // Kestrel decodes a path but for %2F, so the route's key reads a%2Fb both for the key a/b (sent as a%2Fb) and for the
    // key a%2Fb (sent as a%252Fb): a key holding '%' is taken from the request's target as sent, decoded once.
    private static async ValueTask<object?> KeyAsSentAsync(EndpointFilterInvocationContext invocation, EndpointFilterDelegate next)
    {
        var context = invocation.HttpContext;
        var key = invocation.GetArgument<string>(1);
        if (key.Contains('%'))
        {
            if (KeyInTarget(context, key) is not { } sent)
            {
                await context.RequestServices.GetRequiredService<IdempotencyProblems>().WriteAsync(context, IdempotencyProblem.KeyInvalid,
                    "A key holding '%' is read from the request's target as sent, which did not hold it where the path did: send the key percent-encoded as one segment.", null);
                return Results.Empty;
            }

            invocation.Arguments[1] = sent;
        }

        return await next(invocation);
    }

    // The key's segment of the request target, decoded, counted from the end of its path (a prefix stripped before
    // routing leaves the end alone): the last segment of a read, the one before it of a call. Only when that segment,
    // decoded as Kestrel decodes a path (all but %2F), is the key routed.
    private static string? KeyInTarget(HttpContext context, string key)
    {
        if (context.Features.Get<IHttpRequestFeature>()?.RawTarget is not { } target)
        {
            return null;
        }

        var path = target.Split('?', 2)[0];
        if (!path.StartsWith('/'))
        {
            // Absolute form, scheme://authority/path.
            var authority = path.IndexOf("//", StringComparison.Ordinal);
            var start = authority < 0 ? -1 : path.IndexOf('/', authority + 2);
            path = start < 0 ? "" : path[start..];
        }

        var segments = (path.EndsWith('/') ? path[..^1] : path).Split('/');
        var at = segments.Length - (HttpMethods.IsGet(context.Request.Method) ? 1 : 2);
        return at > 0 && DecodedAsThePath(segments[at]) == key ? Uri.UnescapeDataString(segments[at]) : null;
    }

    private static string DecodedAsThePath(string segment) =>
        string.Concat(EncodedSlash().Split(segment).Select(part => EncodedSlash().IsMatch(part) ? part : Uri.UnescapeDataString(part)));

    [GeneratedRegex("(%2[Ff])")]
    private static partial Regex EncodedSlash();
}

/// <summary>The body of <c>claim</c>: what the operation is asked to do, and the attempt asking.</summary>
/// <param name="Input">Compared with the key's first input; another input is refused (422 <c>key-reused</c>).</param>
/// <param name="Attempt">
/// Names this attempt: a caller that lost the answer to a claim asks again with the same value and gets the same
/// claim back, instead of finding its own claim in progress.
/// </param>
internal sealed record OnceClaimBody(string? Input, Guid? Attempt);

/// <summary>The body of <c>complete</c>, <c>renew</c> and <c>release</c>.</summary>
internal sealed record OnceTokenBody(string? Token, [property: JsonConverter(typeof(ResultAsSent))] JsonElement? Result);

/// <summary>
/// A result read as the caller sent it, names repeated or not: the body around it refuses a member given twice, but
/// the result is the caller's JSON, stored after an operation that already ran.
/// </summary>
internal sealed class ResultAsSent : JsonConverter<JsonElement>
{
    public override JsonElement Read(ref Utf8JsonReader reader, Type typeToConvert, JsonSerializerOptions options) => JsonElement.ParseValue(ref reader);

    public override void Write(Utf8JsonWriter writer, JsonElement value, JsonSerializerOptions options) => value.WriteTo(writer);
}

/// <summary>What the Once API answers about a key.</summary>
internal sealed record OnceState(
    string Status,
    string? Token = null,
    DateTimeOffset? LeaseExpiresAt = null,
    JsonElement? Result = null,
    DateTimeOffset? ExpiresAt = null);

internal sealed class OnceHttp(
    IdempotencyGrainCalls calls,
    IdempotencyProblems problems,
    IOptions<IdempotencyOptions> options,
    TimeProvider time)
{
    // Beside a result: the token, JSON's framing and whitespace. A body that may carry a result is read no further
    // than this and the largest result stored, however much the client sends.
    private const int BodyHeadroomBytes = 64 * 1024;

    // A member a body does not take is refused: a misspelt "input" would be hashed as no input at all. So is one given
    // twice ("input" and "Input", names matching whatever their case): which was meant would be a guess. Not within a
    // completion's result (ResultAsSent).
    private static readonly JsonSerializerOptions Json = new(OnceExecutor.Json)
    {
        DefaultIgnoreCondition = JsonIgnoreCondition.WhenWritingNull,
        UnmappedMemberHandling = JsonUnmappedMemberHandling.Disallow,
        AllowDuplicateProperties = false,
    };

    // An answer holds a result one level down: a result as deep as JSON is read (an operator's resolution may be)
    // must still be written.
    private static readonly JsonSerializerOptions Answer = new(Json) { MaxDepth = 65 };

    private IdempotencyPolicy Policy => options.Value.DefaultPolicy;

    public async Task ClaimAsync(HttpContext context, string key)
    {
        if (await BeginAsync<OnceClaimBody>(context, key, tokenCall: false) is not var (grain, body))
        {
            return;
        }

        if (body.Attempt == Guid.Empty)
        {
            await problems.WriteAsync(context, IdempotencyProblem.RequestInvalid, "An \"attempt\" names one attempt: a fresh UUID, never the empty one.", key);
            return;
        }

        var policy = Policy;
        // The caller's own attempt id may come back after the caller ran the operation: never given a lapsed claim. One
        // made here is asked again only by this call, while it has no answer.
        var request = new ClaimRequest(body.Attempt ?? AttemptId.New(), OnceExecutor.Fingerprint(body.Input ?? ""), policy.Lease, policy.Retention,
            policy.OnLapsedLease, AsksAgainOnlyUnanswered: body.Attempt is null, MayHaveAskedBefore: body.Attempt is not null);
        ClaimResult claim;
        try
        {
            // A caller's own attempt may hold a claim from before, which it may have acted on: never given back.
            (claim, _) = await calls.ClaimAsync(grain, request, TimeSpan.Zero, releaseUnanswered: body.Attempt is null, context.RequestAborted);
        }
        catch (IdempotencyUnavailableException ex)
        {
            await problems.WriteUnavailableAsync(context, ex, key);
            return;
        }
        catch (OperationCanceledException) when (IdempotencyMiddleware.ClientLeft(context))
        {
            // The caller left: a claim made for it without its own attempt was given back, and no one is there to answer.
            return;
        }

        switch (claim.Outcome)
        {
            case ClaimOutcome.Acquired:
                await AnswerAsync(context, StatusCodes.Status201Created,
                    new OnceState("acquired", ClaimTokenText.Format(claim.Token!.Value), claim.LeaseExpiresAt));
                return;
            case ClaimOutcome.Completed:
                await CompletedAsync(context, key, claim.Response!, claim.ExpiresAt);
                return;
            case ClaimOutcome.Mismatch:
                await problems.WriteAsync(context, IdempotencyProblem.KeyReused, "This key was first claimed with a different input. Use a new key for a new operation.", key);
                return;
            case ClaimOutcome.OutcomeUnknown:
                await problems.WriteAsync(context, IdempotencyProblem.OutcomeUnknown,
                    "An earlier claim of this key lapsed without a completion; the operation may or may not have taken effect. It is not claimed again.", key);
                return;
            default:
                await problems.WriteAsync(context, IdempotencyProblem.InProgress,
                    "Another attempt holds this key. Ask again after the delay for its result.", key, TimeSpan.FromSeconds(1));
                return;
        }
    }

    public async Task CompleteAsync(HttpContext context, string key)
    {
        if (await BeginAsync<OnceTokenBody>(context, key, tokenCall: true) is not var (grain, body)
            || await TokenAsync(context, key, body) is not { } token)
        {
            return;
        }

        if (body.Result is not { } result)
        {
            await problems.WriteAsync(context, IdempotencyProblem.RequestInvalid, "The body needs a \"result\": the operation's outcome, any JSON value.", key);
            return;
        }

        if (OnceExecutor.StoredJson(result, out _, out _) is not { } bytes)
        {
            await problems.WriteAsync(context, IdempotencyProblem.RequestInvalid,
                "The \"result\" cannot be stored: one of its strings escapes half of a surrogate pair (\\ud800 alone, say), which no UTF-8 text holds.", key);
            return;
        }

        if (bytes.Length > Policy.MaxStoredResponseBytes)
        {
            await problems.WriteAsync(context, IdempotencyProblem.BodyTooLarge,
                $"The result has {bytes.Length} bytes; at most {Policy.MaxStoredResponseBytes} are stored. The claim is still held: release it, or complete it with a smaller result.", key);
            return;
        }

        // Answered without the result: a completion asked again with another result keeps the first one.
        var stored = new StoredResponse(OnceExecutor.ResultStatus, [], bytes, false, bytes.Length);
        await TokenCallAsync(context, key, grain, g => g.CompleteAsync(token, stored), () =>
            AnswerAsync(context, StatusCodes.Status200OK, new OnceState("completed")));
    }

    public async Task RenewAsync(HttpContext context, string key)
    {
        if (await BeginAsync<OnceTokenBody>(context, key, tokenCall: true) is not var (grain, body)
            || await TokenAsync(context, key, body) is not { } token)
        {
            return;
        }

        // Reckoned from before the call: the grain's lease ends no sooner than this.
        var leaseEndsBy = time.GetUtcNow() + Policy.Lease;
        await TokenCallAsync(context, key, grain, g => g.RenewAsync(token, Policy.Lease), () =>
            AnswerAsync(context, StatusCodes.Status200OK, new OnceState("acquired", body.Token, leaseEndsBy)));
    }

    public async Task ReleaseAsync(HttpContext context, string key)
    {
        if (await BeginAsync<OnceTokenBody>(context, key, tokenCall: true) is not var (grain, body)
            || await TokenAsync(context, key, body) is not { } token)
        {
            return;
        }

        await TokenCallAsync(context, key, grain, g => g.ReleaseClaimAsync(token, Policy.Lease), () =>
        {
            context.Response.StatusCode = StatusCodes.Status204NoContent;
            return Task.CompletedTask;
        });
    }

    public async Task ReadAsync(HttpContext context, string key)
    {
        if (await BeginAsync<OnceClaimBody>(context, key, tokenCall: false) is not var (grain, _))
        {
            return;
        }

        IdempotencyRecord record;
        try
        {
            record = await calls.CallAsync(grain, g => g.GetAsync(), context.RequestAborted);
        }
        catch (IdempotencyUnavailableException ex)
        {
            await problems.WriteUnavailableAsync(context, ex, key);
            return;
        }

        switch (record.Status)
        {
            case IdempotencyStatus.Completed:
                await CompletedAsync(context, key, record.Response!, record.ExpiresAt);
                return;
            case IdempotencyStatus.InProgress:
                // A lapsed lease turns into the policy's answer only when the key is next claimed.
                await AnswerAsync(context, StatusCodes.Status200OK,
                    new OnceState(record.LeaseExpiresAt > time.GetUtcNow() ? "inProgress" : "lapsed", LeaseExpiresAt: record.LeaseExpiresAt));
                return;
            case IdempotencyStatus.OutcomeUnknown:
                await AnswerAsync(context, StatusCodes.Status200OK, new OnceState("outcomeUnknown"));
                return;
            default:
                await AnswerAsync(context, StatusCodes.Status200OK, new OnceState("none"));
                return;
        }
    }

    // The key's grain and the request's body, or null once a problem has been answered.
    // tokenCall: complete, renew or release, whose body names the token and may hold a result to store: it is required,
    // and bounded by the largest result stored (and room for the rest). A claim's or a read's may be empty; its input,
    // only hashed, is bounded as an idempotent request's body is.
    private async Task<(IIdempotencyGrain Grain, T Body)?> BeginAsync<T>(HttpContext context, string key, bool tokenCall)
        where T : class
    {
        context.Response.Headers.CacheControl = "no-store";
        if (key.Length > IdempotencyKeyHeader.MaxLength || key.Any(c => c is < '!' or > '~'))
        {
            await problems.WriteAsync(context, IdempotencyProblem.KeyInvalid, $"A key is 1 to {IdempotencyKeyHeader.MaxLength} visible ASCII characters.", null);
            return null;
        }

        var policy = Policy;
        if (policy.ScopeOf(context) is not { } scope)
        {
            await problems.WriteAsync(context,
                context.User.Identity?.IsAuthenticated == true ? IdempotencyProblem.ScopeUnreadable : IdempotencyProblem.ScopeRequired,
                "The Once API needs a caller it can tell apart from others.", key);
            return null;
        }

        // Bounded by what one buffer holds, too: a policy's request bound may be set beyond it.
        var maxBodyBytes = tokenCall ? (long)policy.MaxStoredResponseBytes + BodyHeadroomBytes : Math.Min(policy.MaxRequestBodyBytes, Array.MaxLength);
        T? body;
        try
        {
            using var buffer = context.Request.ContentLength > maxBodyBytes ? null : await PooledBody.ReadAsync(context.Request.Body, maxBodyBytes, context.RequestAborted);
            if (buffer is null)
            {
                await problems.WriteAsync(context, IdempotencyProblem.BodyTooLarge, tokenCall
                    ? $"The body is larger than the {maxBodyBytes} bytes this call takes: the largest result stored, {policy.MaxStoredResponseBytes} bytes, and {BodyHeadroomBytes} more. Send the result without indentation."
                    : $"The body is larger than the {maxBodyBytes} bytes this call takes.", key);
                return null;
            }

            body = buffer.Length == 0 && !tokenCall ? JsonSerializer.Deserialize<T>("{}", Json) : Deserialize<T>(buffer.ToSequence());
        }
        catch (BadHttpRequestException ex)
        {
            // The client's fault, found by the server as the body is read (cut off, malformed chunking, too slow).
            await problems.WriteAsync(context, IdempotencyProblem.BodyUnreadable(ex.StatusCode), ex.Message, key);
            return null;
        }
        catch (JsonException ex)
        {
            await problems.WriteAsync(context, IdempotencyProblem.RequestInvalid, $"The body is not the JSON object this call takes: {ex.Message}", key);
            return null;
        }
        catch (Exception ex) when (ex is IOException or OperationCanceledException && IdempotencyMiddleware.ClientLeft(context))
        {
            // The caller went away mid-body: no one to answer.
            return null;
        }

        if (body is null)
        {
            await problems.WriteAsync(context, IdempotencyProblem.RequestInvalid, "The body must be a JSON object.", key);
            return null;
        }

        return (calls.Grain(OnceExecutor.HttpGrainKey(scope, key)), body);
    }

    // One JSON value, and nothing after it but whitespace, as JsonSerializer reads a span.
    private static T? Deserialize<T>(ReadOnlySequence<byte> bytes)
    {
        var reader = new Utf8JsonReader(bytes, new JsonReaderOptions { MaxDepth = Json.MaxDepth, CommentHandling = Json.ReadCommentHandling, AllowTrailingCommas = Json.AllowTrailingCommas });
        var body = JsonSerializer.Deserialize<T>(ref reader, Json);
        return reader.Read() ? throw new JsonException("The body holds more than one JSON value.") : body;
    }

    private async Task<ClaimToken?> TokenAsync(HttpContext context, string key, OnceTokenBody body)
    {
        if (ClaimTokenText.TryParse(body.Token, out var token))
        {
            return token;
        }

        await problems.WriteAsync(context, IdempotencyProblem.RequestInvalid, "The body needs the \"token\" that claim answered with.", key);
        return null;
    }

    private async Task TokenCallAsync(HttpContext context, string key, IIdempotencyGrain grain, Func<IIdempotencyGrain, Task<bool>> call, Func<Task> onHeld)
    {
        bool held;
        try
        {
            held = await calls.CallAsync(grain, call, context.RequestAborted);
        }
        catch (IdempotencyUnavailableException ex)
        {
            await problems.WriteUnavailableAsync(context, ex, key);
            return;
        }

        if (held)
        {
            await onHeld();
            return;
        }

        await problems.WriteAsync(context, IdempotencyProblem.ClaimNotHeld,
            "This token does not hold the key: it was released or its lease lapsed, another claim holds the key, or the key completed.", key);
    }

    private async Task CompletedAsync(HttpContext context, string key, StoredResponse stored, DateTimeOffset? expiresAt)
    {
        if (stored.BodyOmitted)
        {
            await problems.WriteAsync(context, IdempotencyProblem.ResponseNotStored, OnceExecutor.NotStored(stored), key);
            return;
        }

        JsonDocument result;
        try
        {
            result = JsonDocument.Parse(stored.Body);
        }
        catch (JsonException)
        {
            // Settled by an operator naming the key by its scope's digest, which does not say it is a Once API key.
            await problems.WriteAsync(context, IdempotencyProblem.ResponseNotStored, "The key completed, but its stored result is not JSON.", key);
            return;
        }

        using (result)
        {
            await AnswerAsync(context, StatusCodes.Status200OK, new OnceState("completed", Result: result.RootElement, ExpiresAt: expiresAt));
        }
    }

    private static Task AnswerAsync(HttpContext context, int status, OnceState state)
    {
        context.Response.StatusCode = status;
        return context.Response.WriteAsJsonAsync(state, Answer, context.RequestAborted);
    }
}
