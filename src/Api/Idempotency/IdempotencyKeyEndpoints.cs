using System.Text.Json;
using System.Text.Json.Serialization;
using OrleansIdempotency.Grains;

namespace OrleansIdempotency.AspNetCore;

/// <summary>
/// The operator's surface (DESIGN §4: a key whose outcome is unknown stays refused "until an operator resolves it"):
/// read any key, and settle one in doubt. Keys of every caller are reachable here, so map it behind an
/// authorization policy of its own: <c>app.MapIdempotencyKeys().RequireAuthorization("operators")</c>.
/// </summary>
public static class IdempotencyKeyEndpoints
{
    /// <summary>
    /// Maps <c>GET {prefix}?scope=…&amp;key=…</c> (the key's record) and <c>POST {prefix}/resolve?scope=…&amp;key=…</c>
    /// (settle a key in doubt: with <c>{"response": {...}}</c> it completes with that response and replays it; with
    /// <c>{}</c> or <c>{"response": null}</c> it is released and the next request runs the action).
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
/// <param name="Headers">Its headers, stored as given.</param>
/// <param name="Body">Its body as text (UTF-8), or null.</param>
/// <param name="BodyBase64">Its body as base64, for bytes that are not text; or null.</param>
internal sealed record KnownResponse(int Status, IReadOnlyList<StoredHeader>? Headers, string? Body, string? BodyBase64);

internal sealed record ResolveBody(KnownResponse? Response);

internal sealed record KeyState(
    string Status,
    DateTimeOffset? LeaseExpiresAt = null,
    DateTimeOffset? ExpiresAt = null,
    int? ResponseStatus = null,
    IReadOnlyList<StoredHeader>? ResponseHeaders = null,
    string? ResponseBodyBase64 = null,
    long? ResponseBodyLength = null);

internal sealed class IdempotencyKeysHttp(IdempotencyGrainCalls calls, IdempotencyProblems problems, TimeProvider time)
{
    private static readonly JsonSerializerOptions Json = new(JsonSerializerOptions.Web)
    {
        DefaultIgnoreCondition = JsonIgnoreCondition.WhenWritingNull,
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
            await UnavailableAsync(context, ex, key.Key);
            return;
        }

        var state = record.Status switch
        {
            IdempotencyStatus.Completed => new KeyState("completed", ExpiresAt: record.ExpiresAt, ResponseStatus: record.Response!.StatusCode,
                ResponseHeaders: record.Response.Headers, ResponseBodyBase64: record.Response.BodyOmitted ? null : Convert.ToBase64String(record.Response.Body),
                ResponseBodyLength: record.Response.BodyLength),
            IdempotencyStatus.InProgress => new KeyState(record.LeaseExpiresAt > time.GetUtcNow() ? "inProgress" : "lapsed", record.LeaseExpiresAt, record.ExpiresAt),
            IdempotencyStatus.OutcomeUnknown => new KeyState("outcomeUnknown", ExpiresAt: record.ExpiresAt),
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
            body = context.Request.ContentLength == 0
                ? new ResolveBody(null)
                : await JsonSerializer.DeserializeAsync<ResolveBody>(context.Request.Body, Json, context.RequestAborted);
        }
        catch (JsonException ex)
        {
            await problems.WriteAsync(context, IdempotencyProblem.RequestInvalid, $"The body is not {{\"response\": ...}}: {ex.Message}", key.Key);
            return;
        }

        StoredResponse? outcome = null;
        if (body?.Response is { } known)
        {
            if (Stored(known) is not { } stored)
            {
                await problems.WriteAsync(context, IdempotencyProblem.RequestInvalid,
                    "A response needs a status from 100 to 599, headers with names and values, and at most one of body and bodyBase64 (valid base64).", key.Key);
                return;
            }

            outcome = stored;
        }

        bool settled;
        try
        {
            settled = await calls.CallAsync(calls.Grain(key), g => g.ResolveAsync(outcome), context.RequestAborted);
        }
        catch (IdempotencyUnavailableException ex)
        {
            await UnavailableAsync(context, ex, key.Key);
            return;
        }

        if (!settled)
        {
            await problems.WriteAsync(context, IdempotencyProblem.KeyNotInDoubt,
                "This key's outcome is not in doubt (it is free, running under a live lease, or completed); nothing changed.", key.Key);
            return;
        }

        await context.Response.WriteAsJsonAsync(new KeyState(outcome is null ? "none" : "completed"), Json, context.RequestAborted);
    }

    private static StoredResponse? Stored(KnownResponse known)
    {
        if (known.Status is < 100 or > 599 || (known.Body is not null && known.BodyBase64 is not null)
            || known.Headers?.Any(h => string.IsNullOrEmpty(h.Name) || h.Value is null) == true)
        {
            return null;
        }

        byte[] body;
        if (known.BodyBase64 is { } base64)
        {
            var buffer = new byte[base64.Length];
            if (!Convert.TryFromBase64String(base64, buffer, out var length))
            {
                return null;
            }

            body = buffer[..length];
        }
        else
        {
            body = System.Text.Encoding.UTF8.GetBytes(known.Body ?? "");
        }

        var headers = (known.Headers ?? []).Where(h => !IdempotencyPolicy.NeverStoredHeaders.Contains(h.Name)).ToArray();
        return new StoredResponse(known.Status, headers, body, false, body.Length);
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

        return new IdempotencyKey(scope[0]!, key[0]!);
    }

    private Task UnavailableAsync(HttpContext context, IdempotencyUnavailableException ex, string key) =>
        problems.WriteAsync(context, IdempotencyProblem.Unavailable, $"The idempotency store could not be reached ({ex.InnerException?.GetType().Name}).", key, TimeSpan.FromSeconds(1));
}
