using System.Globalization;
using System.Runtime.CompilerServices;
using System.Runtime.ExceptionServices;
using Microsoft.AspNetCore.Authentication;
using Microsoft.AspNetCore.Http.Features;
using Microsoft.AspNetCore.Http.Timeouts;
using Microsoft.Extensions.Options;
using Microsoft.Extensions.Primitives;
using Microsoft.Net.Http.Headers;
using OrleansIdempotency.Grains;

namespace OrleansIdempotency.AspNetCore;

/// <summary>
/// Makes endpoints with <see cref="IIdempotencyMetadata"/> idempotent (DESIGN §4): claims the key in its grain,
/// runs the endpoint once, stores its response, and replays it to every later caller with the same request.
/// </summary>
internal sealed partial class IdempotencyMiddleware(
    RequestDelegate next,
    IOptions<IdempotencyOptions> options,
    IdempotencyGrainCalls calls,
    IdempotencyProblems problems,
    IdempotencyMetrics metrics,
    ReplayCache replays,
    TimeProvider time,
    ILogger<IdempotencyMiddleware> logger)
{
    /// <summary>The response header that marks a replay.</summary>
    public const string ReplayedHeader = "Idempotent-Replayed";

    // How soon a client told "in progress" should try again: most actions finish within a second.
    private static readonly TimeSpan InProgressRetryAfter = TimeSpan.FromSeconds(1);

    // One delegate for every completion, not a closure per request.
    private readonly Action<bool> completionSettled = stored => metrics.Record(stored ? IdempotencyResults.Executed : IdempotencyResults.InDoubt);

    // Weak: a proxy's reload replaces its routes' endpoints, and a policy held per endpoint would keep every old one.
    private readonly ConditionalWeakTable<Endpoint, IdempotencyPolicy> policies = new();

    public Task InvokeAsync(HttpContext context)
    {
        var endpoint = context.GetEndpoint();
        if (endpoint?.Metadata.GetMetadata<IIdempotencyMetadata>() is not { } metadata)
        {
            return next(context);
        }

        if (!policies.TryGetValue(endpoint, out var policy))
        {
            policy = Resolve(endpoint, metadata);
        }

        return policy.Methods.Contains(context.Request.Method) ? InvokeIdempotentAsync(context, policy) : next(context);
    }

    // Apart from InvokeAsync: the closure captures the metadata, and inside it would be allocated for every request.
    private IdempotencyPolicy Resolve(Endpoint endpoint, IIdempotencyMetadata metadata) =>
        policies.GetValue(endpoint, _ =>
        {
            var policy = options.Value.Resolve(metadata);
            return RouteOf(endpoint, metadata) is { } route ? policy with { Route = route } : policy;
        });

    // Two endpoints with one path told apart by host (or, behind the gateway, by a header) are two routes: a key sent
    // to both is reused, not one's replay for the other. What tells them apart is hashed, not the values a request
    // carried, so the same endpoint reached through another of its hosts, a port, or another casing is the same route.
    // An endpoint bound to every host ("*") keeps the framing of its path alone: one bound to some hosts is told
    // apart from it by its own route part.
    private static string? RouteOf(Endpoint endpoint, IIdempotencyMetadata metadata) =>
        (metadata as IdempotencyMetadata)?.Route
        ?? (endpoint.Metadata.GetMetadata<IHostMetadata>() is { Hosts.Count: > 0 } bound && !bound.Hosts.Any(static host => host is "*" or "*:*")
            ? "hosts " + string.Join(' ', bound.Hosts.Select(static host => host.ToLowerInvariant()).Distinct().Order(StringComparer.Ordinal))
            : null);

    private async Task InvokeIdempotentAsync(HttpContext context, IdempotencyPolicy policy)
    {
        switch (IdempotencyKeyHeader.TryRead(context.Request.Headers[IdempotencyKeyHeader.Name], out var key, out var error))
        {
            case IdempotencyKeyHeader.Status.Missing when !policy.KeyRequired:
                await next(context);
                return;
            case IdempotencyKeyHeader.Status.Missing:
                await RejectAsync(context, IdempotencyProblem.KeyMissing,
                    $"This endpoint requires an {IdempotencyKeyHeader.Name} header: a unique value per logical request (a UUID, say), sent again unchanged on every retry.", null);
                return;
            case IdempotencyKeyHeader.Status.Invalid:
                await RejectAsync(context, IdempotencyProblem.KeyInvalid, error, null);
                return;
        }

        if (policy.ScopeOf(context) is not { } scope)
        {
            await RefuseUnscopedAsync(context, key);
            return;
        }

        byte[]? fingerprint;
        try
        {
            fingerprint = await RequestFingerprint.ComputeAsync(context.Request, policy.Route, policy.MaxRequestBodyBytes, context.RequestAborted);
        }
        catch (BadHttpRequestException ex)
        {
            // The client's fault, found by Kestrel only now that the body is read: answered here, not left to the
            // application's exception handler, which would make it a 500 unless told otherwise. Nothing was claimed.
            await RejectAsync(context, IdempotencyProblem.BodyUnreadable(ex.StatusCode), ex.Message, key);
            return;
        }
        catch (Exception ex) when (ex is IOException or OperationCanceledException && ClientLeft(context))
        {
            // The client went away mid-body (an HTTP/2 reset, a closed connection): no one to answer, nothing claimed.
            // Not left to escape as an unhandled server error. (A request time-out's cancellation goes on to the
            // middleware that answers it.)
            metrics.Record(IdempotencyResults.Abandoned);
            return;
        }

        if (fingerprint is null)
        {
            await RejectAsync(context, IdempotencyProblem.BodyTooLarge,
                $"The request body is larger than the {policy.MaxRequestBodyBytes} bytes this endpoint accepts.", key);
            return;
        }

        var idempotencyKey = new IdempotencyKey(scope, key);
        if (replays.Find(idempotencyKey, fingerprint) is { } known)
        {
            await ReplayAsync(context, known, key);
            return;
        }

        var grain = calls.Grain(idempotencyKey);
        var request = new ClaimRequest(AttemptId.New(), fingerprint, policy.Lease, policy.Retention, policy.OnLapsedLease);
        var wait = policy.ConcurrentDuplicates == ConcurrentDuplicateHandling.Reject ? TimeSpan.Zero : policy.WaitTimeout;
        ClaimResult claim;
        DateTimeOffset askedAt;
        try
        {
            (claim, askedAt) = await calls.ClaimAsync(grain, request, wait, releaseUnanswered: true, context.RequestAborted);
        }
        catch (IdempotencyUnavailableException ex)
        {
            await UnavailableAsync(context, ex, key);
            return;
        }
        catch (OperationCanceledException) when (ClientLeft(context))
        {
            // The client left before the action began: nothing ran, no claim is held, and no one is there to answer.
            metrics.Record(IdempotencyResults.Abandoned);
            return;
        }

        switch (claim.Outcome)
        {
            case ClaimOutcome.Acquired:
                await ExecuteAsync(context, policy, grain, claim.Token!.Value, askedAt + policy.Lease);
                return;
            case ClaimOutcome.Completed:
                replays.Add(idempotencyKey, fingerprint, claim);
                await ReplayAsync(context, claim.Response!, key);
                return;
            case ClaimOutcome.Mismatch:
                await RejectAsync(context, IdempotencyProblem.KeyReused,
                    "This key was first used for a different request (method, route, query or body). Use a new key for a new request.", key);
                return;
            case ClaimOutcome.OutcomeUnknown:
                await RejectAsync(context, IdempotencyProblem.OutcomeUnknown,
                    "An earlier attempt with this key stopped without reporting its outcome; it may or may not have taken effect. It is not run again.", key);
                return;
            default:
                await RejectAsync(context, IdempotencyProblem.InProgress,
                    "The first request with this key has not finished. Retry after the delay to receive its response.", key, InProgressRetryAfter);
                return;
        }
    }

    private async Task ExecuteAsync(HttpContext context, IdempotencyPolicy policy, IIdempotencyGrain grain, ClaimToken token, DateTimeOffset leaseEndsBy)
    {
        var clientGone = context.RequestAborted;
        var connection = context.Features.GetRequiredFeature<IHttpRequestLifetimeFeature>();
        var stream = context.Features.Get<IHttpResetFeature>();
        var clientBody = context.Features.GetRequiredFeature<IHttpResponseBodyFeature>();
        var capture = new ResponseCapture(clientBody, policy.MaxStoredResponseBytes, context.Response, clientGone);
        var lifetime = new DetachedRequestLifetime(connection, stream);
        var renewal = new LeaseRenewal(grain, token, leaseEndsBy, policy.Lease, time, logger);
        try
        {
            try
            {
                context.Features.Set<IHttpResponseBodyFeature>(capture);
                context.Features.Set<IHttpRequestLifetimeFeature>(lifetime);
                if (stream is not null)
                {
                    context.Features.Set<IHttpResetFeature>(lifetime);
                }

                await next(context);
                await capture.FlushWriterAsync();
                if (capture.WriterFailure is { } failure)
                {
                    ExceptionDispatchInfo.Throw(failure);
                }
            }
            catch (Exception exception)
            {
                renewal.Dispose();
                Restore(context.Features, clientBody, connection, stream);
                try
                {
                    await capture.SendCompletedResponseAsync();
                }
                catch (Exception unsent)
                {
                    // The action's own exception is the one to report; its key stays in doubt either way.
                    LogCompletedResponseUnsent(logger, grain.GetPrimaryKeyString(), unsent.GetType().Name);
                }

                // Once its response has begun the action has most likely taken effect, and its client may hold part of
                // an answer: its key is left to lapse (outcome unknown) rather than run again. The same holds once the
                // action cut its own response off, as a proxy does when its backend fails after the request went out.
                var inDoubtBecause = lifetime.InDoubt ? "where it could not tell its outcome"
                    : lifetime.Aborted ? "after aborting its response"
                    : capture.Started || context.Response.HasStarted ? "once its response had begun"
                    : ReleasesOn(policy, exception, context) ? null
                    : ClientLeft(context) ? "after its client left"
                    : "and its policy keeps such a failure in doubt";
                if (inDoubtBecause is null)
                {
                    await calls.ReleaseAsync(grain, token.AttemptId, policy.Lease, policy.Retention);
                    metrics.Record(IdempotencyResults.Released);
                }
                else
                {
                    LogLeftInDoubt(logger, grain.GetPrimaryKeyString(), $"the action threw {exception.GetType().Name} {inDoubtBecause}");
                    metrics.Record(IdempotencyResults.InDoubt);
                }

                throw;
            }

            renewal.Dispose();
            Restore(context.Features, clientBody, connection, stream);
            await SettleAsync(context, policy, grain, token, capture, lifetime);
        }
        finally
        {
            capture.ReturnBuffer();
        }
    }

    /// <summary>
    /// Why what the action wrote is no outcome to replay, though it may have taken effect; null when it is one. The
    /// action cut its own response off, or wrote less than its Content-Length (which Kestrel answers by aborting, or a
    /// 500); it said it cannot tell its outcome; or it replaced its response once begun with one that would release
    /// the key (as a proxy does when its backend fails mid-body: it aborts the client, or answers 502 to one that has
    /// gone).
    /// </summary>
    private string? WhyNoOutcome(HttpContext context, IdempotencyPolicy policy, ResponseCapture capture, DetachedRequestLifetime lifetime)
    {
        var response = context.Response;
        if (lifetime.Aborted)
        {
            return "an aborted response";
        }

        if (lifetime.InDoubt)
        {
            return "an outcome the action could not tell";
        }

        if (capture.Started && capture.StatusAtStart != response.StatusCode && Releases(policy, response.StatusCode))
        {
            return "a response replaced once begun";
        }

        // As Kestrel judges a response at its end: a HEAD's or a 304's Content-Length describes a body not sent, and a
        // Transfer-Encoding overrides it.
        var shortOfItsLength = response.ContentLength > capture.BytesWritten
            && !HttpMethods.IsHead(context.Request.Method)
            && response.StatusCode != StatusCodes.Status304NotModified
            && !response.Headers.ContainsKey(HeaderNames.TransferEncoding);
        return shortOfItsLength ? "a body short of its Content-Length" : null;
    }

    /// <summary>True while the layer runs <paramref name="context"/>'s action under a claim.</summary>
    internal static bool IsRunning(HttpContext context) => context.Features.Get<IHttpRequestLifetimeFeature>() is DetachedRequestLifetime;

    /// <summary>Whether the idempotent action running for <paramref name="context"/> aborted its response (or reset its stream).</summary>
    internal static bool AbortedItsResponse(HttpContext context) =>
        context.Features.Get<IHttpRequestLifetimeFeature>() is DetachedRequestLifetime { Aborted: true };

    /// <summary>
    /// Leaves the key of the idempotent action running for <paramref name="context"/> to its lease, whatever its
    /// response: the action cannot tell whether it took effect. Nothing for a request the layer is not running.
    /// </summary>
    internal static void LeaveInDoubt(HttpContext context)
    {
        if (context.Features.Get<IHttpRequestLifetimeFeature>() is DetachedRequestLifetime lifetime)
        {
            lifetime.InDoubt = true;
        }
    }

    /// <summary>
    /// True when the request's token fired because its client went away, not because a request time-out outside
    /// this layer fired it (that one answers 504 itself, once the cancellation reaches it).
    /// </summary>
    internal static bool ClientLeft(HttpContext context) =>
        context.RequestAborted.IsCancellationRequested
        && context.Features.Get<IHttpRequestTimeoutFeature>() is not { RequestTimeoutToken.IsCancellationRequested: true };

    private static void Restore(IFeatureCollection features, IHttpResponseBodyFeature clientBody, IHttpRequestLifetimeFeature connection, IHttpResetFeature? stream)
    {
        features.Set(clientBody);
        features.Set(connection);
        if (stream is not null)
        {
            features.Set(stream);
        }
    }

    private async Task SettleAsync(HttpContext context, IdempotencyPolicy policy, IIdempotencyGrain grain, ClaimToken token, ResponseCapture capture, DetachedRequestLifetime lifetime)
    {
        var response = context.Response;
        if (WhyNoOutcome(context, policy, capture, lifetime) is { } why)
        {
            LogLeftInDoubt(logger, grain.GetPrimaryKeyString(), why);
            metrics.Record(IdempotencyResults.InDoubt);
            return;
        }

        if (Releases(policy, response.StatusCode))
        {
            await calls.ReleaseAsync(grain, token.AttemptId, policy.Lease, policy.Retention);
            metrics.Record(IdempotencyResults.Released);
            return;
        }

        var headers = StoredHeaders(response.Headers, policy, capture.ArrivedEncoded);
        if (capture.BytesWritten == 0 && response.ContentLength is { } announced && HttpMethods.IsHead(context.Request.Method))
        {
            // A HEAD's Content-Length is the size of the body a GET would get, not of one this response carries (none):
            // stored as a header, since a replay sets a body's length from the body.
            headers.Add(new StoredHeader(HeaderNames.ContentLength, announced.ToString(CultureInfo.InvariantCulture)));
        }

        var stored = new StoredResponse(response.StatusCode, headers, capture.ToArray(), capture.Overflowed, capture.BytesWritten,
            StoredTrailers(context.Features.Get<IHttpResponseTrailersFeature>()?.Trailers));
        // The client may be gone; the outcome is stored regardless, for its retry. It is counted once the store took
        // it or not: at once, or, for one the store could not take now, when the background write lands or gives up.
        if (await calls.CompleteAsync(grain, token, stored, policy.Lease, completionSettled) is false)
        {
            // The lease lapsed under the action (a pause, a partition): its key is in doubt, this outcome unrecorded.
            LogCompletionRefused(logger, grain.GetPrimaryKeyString());
        }
    }

    private async Task ReplayAsync(HttpContext context, StoredResponse stored, string key)
    {
        if (stored.BodyOmitted)
        {
            await RejectAsync(context, IdempotencyProblem.ResponseNotStored, string.Create(CultureInfo.InvariantCulture,
                $"The request with this key completed with status {stored.StatusCode}, but its {stored.BodyLength}-byte response was larger than the layer stores, so it cannot be replayed. It is not run again."), key);
            return;
        }

        var response = context.Response;
        response.StatusCode = stored.StatusCode;
        SetStoredHeaders(response.Headers, stored.Headers);

        response.Headers[ReplayedHeader] = "true";
        metrics.Record(IdempotencyResults.Replayed);
        // A response that cannot carry them (HTTP/1.1) goes without, as the first one would have.
        if (stored.Trailers is { Count: > 0 } trailers && response.SupportsTrailers())
        {
            foreach (var trailer in trailers)
            {
                response.AppendTrailer(trailer.Name, trailer.Value);
            }
        }

        if (stored.Body.Length == 0)
        {
            // 204 and 304 must not carry a body, nor a Content-Length that announces one.
            return;
        }

        response.ContentLength = stored.Body.Length;
        try
        {
            await response.Body.WriteAsync(stored.Body, context.RequestAborted);
        }
        catch (OperationCanceledException) when (context.RequestAborted.IsCancellationRequested)
        {
            // The client left mid-replay; nothing to undo.
            context.Abort();
        }
    }

    private async Task RefuseUnscopedAsync(HttpContext context, string key)
    {
        if (context.User.Identity?.IsAuthenticated == true)
        {
            // Challenging would change nothing: the caller did authenticate, as someone the policy's Scope cannot read.
            LogUnscopedCaller(logger, context.User.Identity.AuthenticationType);
            await RejectAsync(context, IdempotencyProblem.ScopeUnreadable,
                "Idempotency keys on this endpoint belong to a caller, and this authenticated caller carries no identity the endpoint's scope reads.", key);
            return;
        }

        // A 401 must carry a challenge (RFC 9110 §15.5.2), and only the application's authentication knows its scheme:
        // it challenges first; our problem explains the refusal unless the challenge already answered in its own words
        // (or as something else than a 401, a redirect to a login page, say).
        if (context.RequestServices?.GetService<IAuthenticationSchemeProvider>() is { } schemes
            && await schemes.GetDefaultChallengeSchemeAsync() is not null)
        {
            await context.ChallengeAsync();
            if (context.Response.HasStarted || context.Response.StatusCode != StatusCodes.Status401Unauthorized)
            {
                metrics.Record(IdempotencyResults.Rejected);
                return;
            }
        }

        await RejectAsync(context, IdempotencyProblem.ScopeRequired, "Idempotency keys on this endpoint belong to a caller: authenticate.", key);
    }

    private async Task RejectAsync(HttpContext context, IdempotencyProblem problem, string detail, string? key, TimeSpan? retryAfter = null)
    {
        await problems.WriteAsync(context, problem, detail, key, retryAfter);
        metrics.Record(IdempotencyResults.Rejected);
    }

    private async Task UnavailableAsync(HttpContext context, IdempotencyUnavailableException exception, string key)
    {
        await problems.WriteUnavailableAsync(context, exception, key,
            "The idempotency store cannot be reached, so the request was not run. Retry with the same key.");
        metrics.Record(IdempotencyResults.Unavailable);
    }

    // Set, not appended: a header a middleware outside this one set before it ran is in the stored set already.
    private static void SetStoredHeaders(IHeaderDictionary headers, IReadOnlyList<StoredHeader> stored)
    {
        for (var first = 0; first < stored.Count;)
        {
            var name = stored[first].Name;
            var end = first + 1;
            while (end < stored.Count && string.Equals(stored[end].Name, name, StringComparison.OrdinalIgnoreCase))
            {
                end++;
            }

            headers[name] = end == first + 1
                ? new StringValues(stored[first].Value)
                : new StringValues(stored.Skip(first).Take(end - first).Select(h => h.Value).ToArray());
            first = end;
        }
    }

    private bool Releases(IdempotencyPolicy policy, int status) =>
        PolicyPredicates.Releases((policy, status), static s => s.policy.ReleasesKey(s.status), nameof(IdempotencyPolicy.ReleasesKey), logger);

    private bool ReleasesOn(IdempotencyPolicy policy, Exception exception, HttpContext context) =>
        PolicyPredicates.Releases((policy, exception, context), static s => s.policy.ReleasesOnException(s.exception, s.context),
            nameof(IdempotencyPolicy.ReleasesOnException), logger);

    // Every trailer: unlike headers, which servers and middleware add of their own (Date, Set-Cookie), trailers are
    // the action's account of its response (a gRPC call's status), which a replay without them would misstate.
    private static List<StoredHeader>? StoredTrailers(IHeaderDictionary? trailers) =>
        trailers is { Count: > 0 } ? Stored(trailers, 0, static (_, _) => true) : null;

    // Content-Encoding only when the body's bytes arrived encoded (ResponseCapture.ArrivedEncoded).
    private static List<StoredHeader> StoredHeaders(IHeaderDictionary headers, IdempotencyPolicy policy, bool bodyEncoded) =>
        Stored(headers, (policy, bodyEncoded), static (state, name) => state.policy.StoredHeaders.Contains(name) && !IdempotencyPolicy.NeverStoredHeaders.Contains(name)
            && (state.bodyEncoded || !string.Equals(name, HeaderNames.ContentEncoding, StringComparison.OrdinalIgnoreCase)));

    // Each value of each header kept, in order: one sent twice is stored twice. (A state, not a closure: this runs for
    // every new key.)
    private static List<StoredHeader> Stored<TState>(IHeaderDictionary headers, TState state, Func<TState, string, bool> keep)
    {
        var stored = new List<StoredHeader>();
        foreach (var (name, values) in headers)
        {
            if (keep(state, name))
            {
                foreach (var value in values)
                {
                    stored.Add(new StoredHeader(name, value ?? ""));
                }
            }
        }

        return stored;
    }
}
