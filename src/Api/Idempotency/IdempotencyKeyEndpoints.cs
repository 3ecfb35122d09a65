using System.Security.Claims;
using System.Text.Json;
using System.Text.Json.Serialization;
using Microsoft.Extensions.Options;
using OrleansIdempotency.Grains;

namespace OrleansIdempotency.AspNetCore;

/// <summary>
/// The operator's surface (DESIGN §4: a key whose outcome is unknown stays refused "until an operator resolves it"):
/// read any key, and settle one in doubt. Keys of every caller are reachable here, so map it behind an
/// authorization policy of its own, for example <c>app.MapIdempotencyKeys().RequireAuthorization("operators")</c>
/// with an <c>operators</c> policy the application defines (the demo's is <c>idempotency-operators</c>).
/// </summary>
public static class IdempotencyKeyEndpoints
{
    /// <summary>
    /// Maps <c>GET {prefix}?scope=…&amp;key=…</c> (the key's record) and <c>POST {prefix}/resolve?scope=…&amp;key=…</c>
    /// (settle a key in doubt: with <c>{"response": {...}}</c> it completes with that response and replays it; with
    /// <c>{"release": true}</c> it is released and the next request runs the action; anything else is refused). A
    /// resolution that names the <c>claim</c> the read showed settles that claim only.
    /// </summary>
    public static RouteGroupBuilder MapIdempotencyKeys(this IEndpointRouteBuilder endpoints, string prefix = "/idempotency/keys")
    {
        var group = endpoints.MapGroup(prefix);
        group.MapGet("", (HttpContext context, IdempotencyKeysHttp keys) => keys.ReadAsync(context));
        group.MapPost("/resolve", (HttpContext context, IdempotencyKeysHttp keys) => keys.ResolveAsync(context));
        return group;
    }
}

/// <summary>A response an operator settles a key with: what the action is known to have answered.</summary>
/// <param name="Status">Its HTTP status.</param>
/// <param name="Headers">Its headers, stored in the order given, a repeated name's values side by side.</param>
/// <param name="Body">Its body as text (UTF-8), or null.</param>
/// <param name="BodyBase64">Its body as base64, for bytes that are not text; or null.</param>
internal sealed record KnownResponse(int Status, IReadOnlyList<StoredHeader>? Headers, string? Body, string? BodyBase64);

/// <summary>
/// The body of <c>resolve</c>: exactly one of <c>Response</c> and <c>Release</c>, and, optionally, the <c>Claim</c>
/// in doubt the decision is about, as the key's read showed it (null: whichever is in doubt).
/// </summary>
internal sealed record ResolveBody(KnownResponse? Response, bool? Release, string? Claim);

/// <summary>A key as the operator reads it; <c>Claim</c> is the claim that holds or last held it, while it runs or is in doubt.</summary>
internal sealed record KeyState(
    string Status,
    string? Claim = null,
    DateTimeOffset? LeaseExpiresAt = null,
    DateTimeOffset? ExpiresAt = null,
    int? ResponseStatus = null,
    IReadOnlyList<StoredHeader>? ResponseHeaders = null,
    string? ResponseBodyBase64 = null,
    long? ResponseBodyLength = null);

internal sealed partial class IdempotencyKeysHttp(
    IdempotencyGrainCalls calls, IdempotencyProblems problems, IOptions<IdempotencyOptions> options, TimeProvider time, ILogger<IdempotencyKeysHttp> logger)
{
    private static readonly JsonSerializerOptions Json = new(JsonSerializerOptions.Web)
    {
        DefaultIgnoreCondition = JsonIgnoreCondition.WhenWritingNull,
    };

    // A misspelt member must not read as "release": an operator's typo would run the action again.
    private static readonly JsonSerializerOptions StrictJson = new(JsonSerializerOptions.Web)
    {
        UnmappedMemberHandling = JsonUnmappedMemberHandling.Disallow,
    };

    public async Task ReadAsync(HttpContext context)
    {
        if (await KeyAsync(context) is not { } key)
        {
            return;
        }

        IdempotencyRecord record;
        try
        {
            record = await calls.CallAsync(calls.Grain(key), g => g.GetAsync(), context.RequestAborted);
        }
        catch (IdempotencyUnavailableException ex)
        {
            await problems.WriteUnavailableAsync(context, ex, key.Key);
            return;
        }

        var state = record.Status switch
        {
            IdempotencyStatus.Completed => new KeyState("completed", ExpiresAt: record.ExpiresAt, ResponseStatus: record.Response!.StatusCode,
                ResponseHeaders: record.Response.Headers, ResponseBodyBase64: record.Response.BodyOmitted ? null : Convert.ToBase64String(record.Response.Body),
                ResponseBodyLength: record.Response.BodyLength),
            IdempotencyStatus.InProgress => new KeyState(record.LeaseExpiresAt > time.GetUtcNow() ? "inProgress" : "lapsed",
                ClaimTokenText.Format(record.Token), record.LeaseExpiresAt, record.ExpiresAt),
            IdempotencyStatus.OutcomeUnknown => new KeyState("outcomeUnknown", ClaimTokenText.Format(record.Token), ExpiresAt: record.ExpiresAt),
            _ => new KeyState("none"),
        };
        context.Response.Headers.CacheControl = "no-store";
        await context.Response.WriteAsJsonAsync(state, Json, context.RequestAborted);
    }

    public async Task ResolveAsync(HttpContext context)
    {
        if (await KeyAsync(context) is not { } key)
        {
            return;
        }

        ResolveBody? body;
        try
        {
            body = await JsonSerializer.DeserializeAsync<ResolveBody>(context.Request.Body, StrictJson, context.RequestAborted);
        }
        catch (JsonException ex)
        {
            await problems.WriteAsync(context, IdempotencyProblem.RequestInvalid, $"The body is not {{\"response\": ...}} or {{\"release\": true}}: {ex.Message}", key.Key);
            return;
        }

        if (body is null || (body.Response is null) == (body.Release != true))
        {
            await problems.WriteAsync(context, IdempotencyProblem.RequestInvalid,
                "Say exactly one thing: {\"response\": {...}} (what the action is known to have answered) or {\"release\": true} (it did not take effect).", key.Key);
            return;
        }

        ClaimToken? claim = null;
        if (body.Claim is not null)
        {
            if (!ClaimTokenText.TryParse(body.Claim, out var named))
            {
                await problems.WriteAsync(context, IdempotencyProblem.RequestInvalid, "\"claim\" is the claim a read of this key showed, as it showed it.", key.Key);
                return;
            }

            claim = named;
        }

        StoredResponse? outcome = null;
        if (body.Response is { } known)
        {
            if (Refusal(known, key) is { } refusal)
            {
                await problems.WriteAsync(context, IdempotencyProblem.RequestInvalid, refusal, key.Key);
                return;
            }

            outcome = Stored(known);
        }

        ResolveOutcome resolved;
        var grain = calls.Grain(key);
        try
        {
            // Without one, the claim the key holds now is named: a resolution whose answer was lost, asked again by the
            // calls' own retry, then finds it settled by itself instead of answering that nothing changed.
            if (claim is null
                && await calls.CallAsync(grain, g => g.GetAsync(), context.RequestAborted) is { Status: IdempotencyStatus.InProgress or IdempotencyStatus.OutcomeUnknown } held)
            {
                claim = held.Token;
            }

            resolved = await calls.CallAsync(grain, g => g.ResolveAsync(outcome, claim), context.RequestAborted);
        }
        catch (IdempotencyUnavailableException ex)
        {
            await problems.WriteUnavailableAsync(context, ex, key.Key);
            return;
        }

        switch (resolved)
        {
            case ResolveOutcome.NotInDoubt:
                await problems.WriteAsync(context, IdempotencyProblem.KeyNotInDoubt,
                    "This key's outcome is not in doubt (it is free, running under a live lease, or completed); nothing changed.", key.Key);
                return;
            case ResolveOutcome.OtherClaim:
                await problems.WriteAsync(context, IdempotencyProblem.KeyChanged,
                    "This key is in doubt for another claim than the one named: it was claimed again since it was read. Nothing changed; read it again.", key.Key);
                return;
        }

        // An audit trail: a release lets the action run again, a response stands for the action's from now on.
        LogSettled(logger, key.ToString(), claim is { } settled ? ClaimTokenText.Format(settled) : "(none)", outcome is null ? "released" : $"completed with status {outcome.StatusCode}",
            context.User.Identity?.Name ?? context.User.FindFirst(ClaimTypes.NameIdentifier)?.Value ?? "an unnamed caller");
        await context.Response.WriteAsJsonAsync(new KeyState(outcome is null ? "none" : "completed"), Json, context.RequestAborted);
    }

    [LoggerMessage(Level = LogLevel.Warning, Message = "Idempotency key {Key}: its claim {Claim} in doubt was settled by an operator, {Decision}, as {Operator} asked.")]
    private static partial void LogSettled(ILogger logger, string key, string claim, string decision, string @operator);

    // Why a response cannot be stored as given, or null: every replay of it must be a valid answer.
    private string? Refusal(KnownResponse known, IdempotencyKey key)
    {
        var policy = options.Value.DefaultPolicy;
        // As the middleware takes it: a predicate that throws counts as no, so the operator's answer is stored.
        if (known.Status is < 200 or > 599
            || PolicyPredicates.Releases((policy, known.Status), static s => s.policy.ReleasesKey(s.Status), nameof(IdempotencyPolicy.ReleasesKey), logger))
        {
            return $"Status {known.Status} cannot be stored: a key is settled with a final answer from 200 to 599 that would not release it (to let the next request run the action, release the key instead).";
        }

        if (known.Body is not null && known.BodyBase64 is not null)
        {
            return "Give the body as text (body) or as base64 (bodyBase64), not both.";
        }

        if (known.BodyBase64 is { } base64 && !Convert.TryFromBase64String(base64, new byte[base64.Length], out _))
        {
            return "bodyBase64 is not valid base64.";
        }

        foreach (var header in known.Headers ?? [])
        {
            if (!HttpToken.IsFieldName(header.Name) || !IsFieldValue(header.Value) || IdempotencyPolicy.NeverStoredHeaders.Contains(header.Name))
            {
                return $"Header '{header.Name}' cannot be stored: a name is a token, a value visible ASCII, and hop-by-hop, Set-Cookie, Date, Content-Length (but a HEAD's, which the layer keeps itself) and the layer's own headers are never stored.";
            }
        }

        var body = Body(known);
        if (body.Length > policy.MaxStoredResponseBytes)
        {
            return $"The body has {body.Length} bytes; at most {policy.MaxStoredResponseBytes} are stored.";
        }

        if (known.Status is 204 or 205 or 304 && body.Length > 0)
        {
            return $"Status {known.Status} has no body.";
        }

        if (key.Scope.StartsWith("once:", StringComparison.Ordinal) && (known.Status != Once.OnceExecutor.ResultStatus || !IsJson(body)))
        {
            return $"A Once API key's result is JSON under status {Once.OnceExecutor.ResultStatus}.";
        }

        return null;
    }

    private static StoredResponse Stored(KnownResponse known)
    {
        var body = Body(known);
        // Repeated names side by side, in the order given: a replay sets each name once with all of its values.
        var headers = (known.Headers ?? []).GroupBy(h => h.Name, StringComparer.OrdinalIgnoreCase).SelectMany(g => g).ToList();
        return new StoredResponse(known.Status, headers, body, false, body.Length);
    }

    private static byte[] Body(KnownResponse known) =>
        known.BodyBase64 is { } base64 ? Convert.FromBase64String(base64) : System.Text.Encoding.UTF8.GetBytes(known.Body ?? "");


    private static bool IsFieldValue(string? value) =>
        value is not null && value.All(c => c is '\t' or (>= ' ' and <= '~'));

    // JSON that a replay can write back: parsing alone accepts a string escaping half a surrogate pair.
    private static bool IsJson(byte[] body)
    {
        try
        {
            using var document = JsonDocument.Parse(body);
            return Once.OnceExecutor.StoredJson(document.RootElement, out _, out _) is not null;
        }
        catch (JsonException)
        {
            return false;
        }
    }

    private async Task<IdempotencyKey?> KeyAsync(HttpContext context)
    {
        var query = context.Request.Query;
        if (query["scope"] is not { Count: 1 } scope || string.IsNullOrEmpty(scope[0]) || query["key"] is not { Count: 1 } key || string.IsNullOrEmpty(key[0]))
        {
            await problems.WriteAsync(context, IdempotencyProblem.RequestInvalid,
                "Name the key with the query parameters scope (user:alice, say) and key, once each.", null);
            return null;
        }

        // A key as a client sends it in the header, quoted, names the key it quotes (an operator pastes it from a log);
        // any other is taken as it is, as is any key of the Once API, which never came from the header: ExecuteOnceAsync
        // takes any text, and a path segment may hold quotes. So is any key under a scope named by its digest, which
        // copies the grain key a log shows (a Once API key's scope may be digested too).
        var named = key[0]!;
        var unquoted = named;
        var storedScope = IdempotencyKey.IsDigest(scope[0]!);
        var quotedAsTheHeader = named.StartsWith('"') && !storedScope
            && !scope[0]!.StartsWith(Once.OnceExecutor.AppScopePrefix, StringComparison.Ordinal)
            && !scope[0]!.StartsWith(Once.OnceExecutor.HttpScopePrefix, StringComparison.Ordinal);
        if (quotedAsTheHeader && IdempotencyKeyHeader.TryRead(named, out unquoted, out var error) != IdempotencyKeyHeader.Status.Valid)
        {
            await problems.WriteAsync(context, IdempotencyProblem.RequestInvalid, $"The key is quoted as the header quotes it, but: {error}", null);
            return null;
        }

        // No record holds another: PostgreSQL would refuse it, a failure no retry mends.
        if (!Once.OnceExecutor.IsStorableKey(unquoted))
        {
            await problems.WriteAsync(context, IdempotencyProblem.RequestInvalid, Once.OnceExecutor.StorableKeyRule, null);
            return null;
        }

        // A digest from a log (a scope too long for a grain key, holding a NUL or half a surrogate pair) names the key
        // as stored.
        return new IdempotencyKey(scope[0]!, unquoted) { ScopeIsStored = storedScope };
    }
}
