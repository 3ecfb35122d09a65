using System.Collections.Frozen;
using System.Security.Claims;
using OrleansIdempotency.Grains;

namespace OrleansIdempotency.AspNetCore;

/// <summary>What a request that arrives while the first one with its key is still running gets.</summary>
public enum ConcurrentDuplicateHandling
{
    /// <summary>Waits (up to <see cref="IdempotencyPolicy.WaitTimeout"/>) for the first to finish, then replays its response.</summary>
    Wait,

    /// <summary>Answers 409 with <c>Retry-After</c> at once.</summary>
    Reject,
}

/// <summary>
/// How an endpoint is made idempotent. Immutable: derive variants with <c>with</c>, for example
/// <c>IdempotencyPolicy.Default with { ConcurrentDuplicates = ConcurrentDuplicateHandling.Reject }</c>.
/// </summary>
public sealed record IdempotencyPolicy
{
    /// <summary>
    /// The headers stored with a response when their endpoint names no others (DESIGN §4), plus the two that
    /// describe the stored bytes themselves (<c>Content-Encoding</c>, <c>Content-Language</c>), the two that RFC 9110
    /// requires of a stored status (<c>WWW-Authenticate</c> on a 401, <c>Allow</c> on a 405: a gateway's backend answers
    /// both), and gRPC's status, which an error answered before any message carries in its headers alone (a
    /// "trailers-only" answer).
    /// </summary>
    public static readonly FrozenSet<string> DefaultStoredHeaders = FrozenSet.ToFrozenSet(
        ["Content-Type", "Content-Encoding", "Content-Language", "Content-Location", "Location", "ETag", "Last-Modified", "Cache-Control",
         "WWW-Authenticate", "Allow", "grpc-status", "grpc-message", "grpc-status-details-bin"],
        StringComparer.OrdinalIgnoreCase);

    /// <summary>
    /// Headers never stored, whatever an endpoint names: they describe the connection or this one response, not the
    /// result (RFC 9110 §7.6.1 hop-by-hop headers, <c>Set-Cookie</c>, <c>Date</c>), or the layer sets them itself.
    /// </summary>
    public static readonly FrozenSet<string> NeverStoredHeaders = FrozenSet.ToFrozenSet(
        ["Set-Cookie", "Date", "Connection", "Keep-Alive", "Proxy-Authenticate", "Proxy-Authorization", "TE", "Trailer",
         "Transfer-Encoding", "Upgrade", "Content-Length", "Idempotent-Replayed"],
        StringComparer.OrdinalIgnoreCase);

    /// <summary>The policy endpoints get unless they name another.</summary>
    public static IdempotencyPolicy Default { get; } = new();

    /// <summary>Whether a request without an <c>Idempotency-Key</c> is refused (400). The default is true.</summary>
    /// <remarks>When false, a request without a key passes through untouched.</remarks>
    public bool KeyRequired { get; init; } = true;

    /// <summary>How long a key is remembered after it is claimed or completed. The default is 24 hours.</summary>
    public TimeSpan Retention { get; init; } = TimeSpan.FromHours(24);

    /// <summary>
    /// How long a claim lives without completion. While the action runs, the layer renews it every third of this;
    /// if the process dies, the key's outcome becomes unknown after at most this long. The default is 30 seconds.
    /// </summary>
    public TimeSpan Lease { get; init; } = TimeSpan.FromSeconds(30);

    /// <summary>What concurrent duplicates get. The default is <see cref="ConcurrentDuplicateHandling.Wait"/>.</summary>
    public ConcurrentDuplicateHandling ConcurrentDuplicates { get; init; } = ConcurrentDuplicateHandling.Wait;

    /// <summary>How long a concurrent duplicate waits before it gets 409. The default is 10 seconds.</summary>
    public TimeSpan WaitTimeout { get; init; } = TimeSpan.FromSeconds(10);

    /// <summary>
    /// What a lease that ran out without completion becomes. The default,
    /// <see cref="LapsedLeasePolicy.OutcomeUnknown"/>, never re-runs the action silently;
    /// <see cref="LapsedLeasePolicy.Reclaim"/> lets the next request re-run it (at-least-once).
    /// </summary>
    public LapsedLeasePolicy OnLapsedLease { get; init; } = LapsedLeasePolicy.OutcomeUnknown;

    /// <summary>
    /// The largest response body stored for replay. Larger responses still reach the first caller whole; later
    /// callers get 409 <c>response-not-stored</c> and the action is not run again. The default is 1 MiB; at most
    /// <see cref="MaxStorableResponseBytes"/>.
    /// </summary>
    public int MaxStoredResponseBytes { get; init; } = 1024 * 1024;

    /// <summary>
    /// The most <see cref="MaxStoredResponseBytes"/> may be: 64 MiB. A stored response travels in a grain call, and
    /// Orleans closes a connection whose message body passes 100 MB (<c>MessagingOptions.MaxMessageBodySize</c>): a
    /// completion that large would never land, and its key, whose action ran, would lapse into an unknown outcome.
    /// </summary>
    public const int MaxStorableResponseBytes = 64 * 1024 * 1024;

    /// <summary>The largest request body accepted for fingerprinting; larger ones get 413. The default is 10 MiB.</summary>
    public long MaxRequestBodyBytes { get; init; } = 10 * 1024 * 1024;

    /// <summary>Response headers stored and replayed. The default is <see cref="DefaultStoredHeaders"/>.</summary>
    public FrozenSet<string> StoredHeaders { get; init; } = DefaultStoredHeaders;

    /// <summary>The methods made idempotent; others pass through untouched. The default is POST and PATCH.</summary>
    public FrozenSet<string> Methods { get; init; } = FrozenSet.ToFrozenSet([HttpMethods.Post, HttpMethods.Patch], StringComparer.OrdinalIgnoreCase);

    /// <summary>
    /// Whose key it is: the same key from two scopes names two independent keys. Returns null for a caller
    /// without a scope. The default is the authenticated user's <see cref="ClaimTypes.NameIdentifier"/>.
    /// </summary>
    public Func<HttpContext, string?> Scope { get; init; } = IdempotencyScope.User;

    /// <summary>
    /// Whether anonymous callers share the one scope <see cref="IdempotencyScope.Anonymous"/> (true) or are refused
    /// with 401 (false). The default is true. An authenticated caller without a scope is refused either way.
    /// </summary>
    public bool AllowAnonymous { get; init; } = true;

    /// <summary>
    /// The caller's scope, or null for a caller refused here: an anonymous one unless <see cref="AllowAnonymous"/>,
    /// and an authenticated one that <see cref="Scope"/> cannot tell apart (a principal without the claim it reads),
    /// who would otherwise share the anonymous scope, and its keys, with every other such caller.
    /// </summary>
    internal string? ScopeOf(HttpContext context) =>
        Scope(context) ?? (AllowAnonymous && context.User.Identity?.IsAuthenticated != true ? IdempotencyScope.Anonymous : null);

    /// <summary>
    /// Whether a response with this status releases the key so the client may retry under it instead of storing
    /// it. The default releases on 5xx, 408, 425 and 429 (DESIGN §4).
    /// </summary>
    public Func<int, bool> ReleasesKey { get; init; } = static status => status is >= 500 or 408 or 425 or 429;

    /// <summary>
    /// Whether an exception from the action releases the key so the client may retry under it. The default
    /// releases, unless the client had gone (the connection's <see cref="HttpContext.RequestAborted"/>, which the
    /// action itself does not see: <see cref="DetachedRequestLifetime"/>; not a request time-out outside this layer,
    /// which fires that token too): an action that failed once its client had
    /// gone may have been cut off by it after taking effect, so its key is left to lapse into an unknown outcome
    /// rather than run twice. Not asked once the action's response has begun (a byte written, or the response
    /// started): the action has most likely taken effect and its client may hold part of an answer, so its key is
    /// left in doubt whatever this says.
    /// </summary>
    public Func<Exception, HttpContext, bool> ReleasesOnException { get; init; } =
        static (_, context) => !IdempotencyMiddleware.ClientLeft(context);

    /// <summary>
    /// What tells the endpoint apart from others on its path, for its fingerprint (DESIGN §4's route): the hosts it
    /// is bound to, or a gateway route's id; null when its method and path do. Set by the layer per endpoint.
    /// </summary>
    internal string? Route { get; init; }

    /// <summary>Adds <paramref name="headers"/> to the stored headers (never the ones in <see cref="NeverStoredHeaders"/>).</summary>
    public IdempotencyPolicy WithStoredHeaders(params string[] headers) =>
        this with { StoredHeaders = StoredHeaders.Concat(headers).ToFrozenSet(StringComparer.OrdinalIgnoreCase) };

    /// <summary>The longest <see cref="Retention"/> and <see cref="WaitTimeout"/>: ten years.</summary>
    public static readonly TimeSpan MaxDuration = TimeSpan.FromDays(3650);

    /// <summary>Throws when a value is out of range, naming it.</summary>
    public IdempotencyPolicy Validate()
    {
        Positive(Retention, nameof(Retention));
        Positive(Lease, nameof(Lease));
        ArgumentOutOfRangeException.ThrowIfLessThan(WaitTimeout, TimeSpan.Zero, nameof(WaitTimeout));
        // Added to the time of each request: a "forever" would overflow there and fail every request instead of the start.
        ArgumentOutOfRangeException.ThrowIfGreaterThan(Retention, MaxDuration, nameof(Retention));
        ArgumentOutOfRangeException.ThrowIfGreaterThan(WaitTimeout, MaxDuration, nameof(WaitTimeout));
        ArgumentOutOfRangeException.ThrowIfNegative(MaxStoredResponseBytes, nameof(MaxStoredResponseBytes));
        ArgumentOutOfRangeException.ThrowIfGreaterThan(MaxStoredResponseBytes, MaxStorableResponseBytes, nameof(MaxStoredResponseBytes));
        ArgumentOutOfRangeException.ThrowIfNegative(MaxRequestBodyBytes, nameof(MaxRequestBodyBytes));
        if (Retention <= Lease)
        {
            throw new ArgumentOutOfRangeException(nameof(Retention), Retention, "Retention must be longer than the lease.");
        }

        return this;

        static void Positive(TimeSpan value, string name)
        {
            if (value <= TimeSpan.Zero)
            {
                throw new ArgumentOutOfRangeException(name, value, $"{name} must be positive.");
            }
        }
    }
}
