namespace OrleansIdempotency.Client;

/// <summary>How <see cref="IdempotencyKeyHandler"/> keys requests and waits for ones in progress.</summary>
public sealed class IdempotencyKeyOptions
{
    /// <summary>
    /// The methods that get a key: POST and PATCH, as the server's layer makes idempotent by default. Read once, when
    /// a handler is made.
    /// </summary>
    public ISet<HttpMethod> Methods { get; init; } = new HashSet<HttpMethod> { HttpMethod.Post, HttpMethod.Patch };

    /// <summary>
    /// Makes a key for a new logical request: 1 to 255 printable ASCII characters but a comma, sent as a structured-field String
    /// (<c>"…"</c>, as draft-ietf-httpapi-idempotency-key-header-07 asks). The default is a random UUID.
    /// </summary>
    public Func<string> NewKey { get; init; } = static () => Guid.NewGuid().ToString();

    /// <summary>
    /// How long, in all, a request is sent again while the server says the first one with its key is still running
    /// (409 with <c>Retry-After</c>); after that the 409 is returned to the caller. The default is 30 seconds. It
    /// bounds when the last attempt is sent, not its answer: the server may hold that attempt up to its own wait (10 s
    /// by default) first. The first request may still be running then (its lease is renewed while it runs): a caller
    /// that asks again later must send the same key, which the request it passed in carries
    /// (<c>response.RequestMessage</c>); a new request would get a new key and run the action again.
    /// </summary>
    public TimeSpan InProgressWait { get; init; } = TimeSpan.FromSeconds(30);

    /// <summary>
    /// The largest content a keyed request buffers so that it can be sent again: 10 MiB by default, the server's
    /// default <c>MaxRequestBodyBytes</c> (a larger body is refused there with 413 anyway). A larger content fails
    /// before anything is sent (<see cref="InvalidOperationException"/>), instead of being held in memory whole; raise both together (at most
    /// <see cref="int.MaxValue"/>, the most an <see cref="HttpContent"/> buffers).
    /// </summary>
    public long MaxBufferedContentBytes { get; init; } = 10 * 1024 * 1024;
}
