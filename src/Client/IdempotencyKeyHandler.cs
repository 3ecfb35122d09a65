using System.Net;

namespace OrleansIdempotency.Client;

/// <summary>
/// The client side of an idempotent API (DESIGN §5): gives each logical request that changes something a fresh
/// <c>Idempotency-Key</c>, which stays on the request through every retry, and waits out a
/// <c>409 Conflict</c> with <c>Retry-After</c> (the first request with the key is still running) by sending the same
/// request again, with the same key, until it gets the outcome.
/// </summary>
/// <remarks>
/// Add it before a retrying handler (<c>AddIdempotencyKeys().AddStandardResilienceHandler()</c>): the key is then
/// on the request before the retries copy it, so every attempt carries the same key, and the server runs the action
/// once however many attempts reach it. A key already on the request (one the caller keeps across its own retries,
/// say) is left as it is. A request is sent again only if its content can be read again (as string, byte-array and
/// JSON content can).
/// </remarks>
public sealed class IdempotencyKeyHandler(IdempotencyKeyOptions options, TimeProvider time) : DelegatingHandler
{
    /// <summary>The request header that carries the key.</summary>
    public const string HeaderName = "Idempotency-Key";

    /// <summary>Uses <paramref name="options"/> and the system clock.</summary>
    public IdempotencyKeyHandler(IdempotencyKeyOptions options)
        : this(options, TimeProvider.System)
    {
    }

    protected override async Task<HttpResponseMessage> SendAsync(HttpRequestMessage request, CancellationToken cancellationToken)
    {
        if (!options.Methods.Contains(request.Method))
        {
            return await base.SendAsync(request, cancellationToken);
        }

        if (!request.Headers.Contains(HeaderName))
        {
            request.Headers.Add(HeaderName, options.NewKey());
        }

        var giveUpAt = time.GetUtcNow() + options.InProgressWait;
        while (true)
        {
            var response = await base.SendAsync(request, cancellationToken);
            if (response.StatusCode != HttpStatusCode.Conflict || RetryAfter(response) is not { } delay || time.GetUtcNow() + delay > giveUpAt)
            {
                return response;
            }

            response.Dispose();
            await Task.Delay(delay, time, cancellationToken);
        }
    }

    /// <summary>
    /// How long the server asks the client to wait. Of the layer's 409s only "in progress" carries it; a 409 without
    /// it (an unknown outcome, a response too large to store) will not change by waiting.
    /// </summary>
    private TimeSpan? RetryAfter(HttpResponseMessage response) => response.Headers.RetryAfter switch
    {
        { Delta: { } delta } => delta,
        { Date: { } date } => date - time.GetUtcNow() is { Ticks: > 0 } left ? left : TimeSpan.Zero,
        _ => null,
    };
}
