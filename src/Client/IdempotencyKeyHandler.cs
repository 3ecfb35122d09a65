using System.Collections.Frozen;
using System.Net;
using System.Text.Json;

namespace OrleansIdempotency.Client;

/// <summary>
/// The client side of an idempotent API (DESIGN §5): gives each logical request that changes something a fresh
/// <c>Idempotency-Key</c>, which stays on the request through every retry, and waits out the layer's
/// <c>409 Conflict</c> <c>request-in-progress</c> problem, with its <c>Retry-After</c> (the first request with the key
/// is still running), by sending the same request again, with the same key, until it gets the outcome.
/// </summary>
/// <remarks>
/// Add it before the resilience handler (<c>AddIdempotencyKeys().AddStandardResilienceHandler()</c>): the key is
/// then on the request before any attempt is made, so every attempt carries it, retried or hedged (a hedging handler
/// sends copies of the request, which would otherwise each get a key of their own), and the server runs the action
/// once however many attempts reach it. A key already on the request (one the caller keeps across its own retries,
/// say) is left as it is. The content of a keyed request is buffered first, so the request can be sent again, up to
/// <see cref="IdempotencyKeyOptions.MaxBufferedContentBytes"/>.
/// Any other 409 is returned as it is, <c>Retry-After</c> or not: only the layer's problem says that the first request
/// with this key is still running and will have an outcome to replay; another service's 409 says nothing of the kind,
/// and sending the request again could run it twice.
/// </remarks>
public sealed class IdempotencyKeyHandler : DelegatingHandler
{
    /// <summary>The request header that carries the key.</summary>
    public const string HeaderName = "Idempotency-Key";

    // The longest key the server's layer (and the draft's advice) accepts.
    private const int MaxKeyLength = 255;

    // A Retry-After of 0 or in the past must not turn the wait into a loop of requests.
    private static readonly TimeSpan ShortestWait = TimeSpan.FromMilliseconds(100);

    private static readonly TimeSpan LongestWait = TimeSpan.FromMilliseconds(int.MaxValue);

    // The layer's problems are a few hundred bytes.
    private const int MaxProblemBytes = 64 * 1024;

    private readonly IdempotencyKeyOptions options;
    private readonly FrozenSet<HttpMethod> methods;
    private readonly TimeProvider time;

    /// <summary>Uses <paramref name="options"/> and the system clock.</summary>
    public IdempotencyKeyHandler(IdempotencyKeyOptions options)
        : this(options, TimeProvider.System)
    {
    }

    /// <summary>Uses <paramref name="options"/> (validated here) and <paramref name="time"/> for the waits.</summary>
    public IdempotencyKeyHandler(IdempotencyKeyOptions options, TimeProvider time)
    {
        Validate(options);
        ArgumentNullException.ThrowIfNull(time);
        this.options = options;
        // A copy: the options are shared by every handler a factory builds, and a set changed later (while others read
        // it) would change which requests are keyed under the handlers' feet.
        methods = options.Methods.ToFrozenSet();
        this.time = time;
    }

    /// <summary>Throws for options no handler can work with; called where they are registered, too, so that they fail at start.</summary>
    internal static void Validate(IdempotencyKeyOptions options)
    {
        ArgumentNullException.ThrowIfNull(options);
        ArgumentNullException.ThrowIfNull(options.Methods, nameof(options.Methods));
        ArgumentNullException.ThrowIfNull(options.NewKey, nameof(options.NewKey));
        ArgumentOutOfRangeException.ThrowIfLessThan(options.InProgressWait, TimeSpan.Zero, nameof(options.InProgressWait));
        ArgumentOutOfRangeException.ThrowIfNegative(options.MaxBufferedContentBytes, nameof(options.MaxBufferedContentBytes));
        // HttpContent buffers at most that much.
        ArgumentOutOfRangeException.ThrowIfGreaterThan(options.MaxBufferedContentBytes, int.MaxValue, nameof(options.MaxBufferedContentBytes));
    }

    protected override async Task<HttpResponseMessage> SendAsync(HttpRequestMessage request, CancellationToken cancellationToken)
    {
        if (!methods.Contains(request.Method))
        {
            return await base.SendAsync(request, cancellationToken).ConfigureAwait(false);
        }

        AddKey(request);
        if (request.Content is { } content)
        {
            await BufferAsync(content, cancellationToken).ConfigureAwait(false);
        }

        var now = time.GetUtcNow();
        var giveUpAt = options.InProgressWait < DateTimeOffset.MaxValue - now ? now + options.InProgressWait : DateTimeOffset.MaxValue;
        while (true)
        {
            var response = await base.SendAsync(request, cancellationToken).ConfigureAwait(false);
            if (WaitBeforeAskingAgain(response, giveUpAt) is not { } delay || !await IsInProgressProblemAsync(response, cancellationToken).ConfigureAwait(false))
            {
                return response;
            }

            response.Dispose();
            await Task.Delay(delay, time, cancellationToken).ConfigureAwait(false);
        }
    }

    // A keyed request's synchronous path blocks on the asynchronous one, keying and waiting alike, as HttpClient.Send
    // blocks anyway. On the thread pool, off the caller's SynchronizationContext and TaskScheduler, which are blocked
    // here: an inner handler that awaits without ConfigureAwait(false) would otherwise wait for the very thread it holds
    // up. Any other request keeps the inner handler's own synchronous path, which blocks no second thread.
    protected override HttpResponseMessage Send(HttpRequestMessage request, CancellationToken cancellationToken) =>
        methods.Contains(request.Method)
            ? Task.Run(() => SendAsync(request, cancellationToken), cancellationToken).GetAwaiter().GetResult()
            : base.Send(request, cancellationToken);

    // One whose length is known is refused before a byte of it is read; one of unknown length stops at the bound as it
    // is read. Either way InvalidOperationException, which retry policies do not take for a passing failure, as they
    // take the HttpRequestException HttpContent throws.
    private async Task BufferAsync(HttpContent content, CancellationToken cancellationToken)
    {
        var max = options.MaxBufferedContentBytes;
        if (content.Headers.ContentLength > max)
        {
            throw TooLarge($"The request's content ({content.Headers.ContentLength} bytes)", max, null);
        }

        try
        {
            await content.LoadIntoBufferAsync(max, cancellationToken).ConfigureAwait(false);
        }
        catch (HttpRequestException ex) when (ex.HttpRequestError == HttpRequestError.ConfigurationLimitExceeded)
        {
            throw TooLarge("The request's content", max, ex);
        }
    }

    private static InvalidOperationException TooLarge(string content, long max, Exception? inner) => new(
        $"{content} is larger than the {max} bytes {nameof(IdempotencyKeyOptions)}.{nameof(IdempotencyKeyOptions.MaxBufferedContentBytes)} lets a keyed request buffer to send it again.",
        inner);

    // A key the caller put on the content's headers goes out as a request header too: a second one beside it would be
    // refused by the server (two Idempotency-Key fields).
    private void AddKey(HttpRequestMessage request)
    {
        if (!request.Headers.Contains(HeaderName) && request.Content?.Headers.Contains(HeaderName) != true)
        {
            request.Headers.Add(HeaderName, StructuredFieldString(options.NewKey()));
        }
    }

    // draft-ietf-httpapi-idempotency-key-header-07: the value is a structured-field String, "quoted", with \ and "
    // escaped. A key that no String can hold is refused here, before anything is sent, and so is a comma, which the
    // server's layer refuses (header lines joined with commas would make it ambiguous).
    private static string StructuredFieldString(string key)
    {
        if (key is not { Length: > 0 and <= MaxKeyLength } || key.Any(c => c is < ' ' or > '~' or ','))
        {
            throw new InvalidOperationException($"{nameof(IdempotencyKeyOptions)}.{nameof(IdempotencyKeyOptions.NewKey)} made a key that is not 1 to {MaxKeyLength} printable ASCII characters without a comma.");
        }

        return "\"" + key.Replace("\\", "\\\\", StringComparison.Ordinal).Replace("\"", "\\\"", StringComparison.Ordinal) + "\"";
    }

    /// <summary>
    /// True when <paramref name="response"/> is the layer's problem for a key in progress. Any other 409 with
    /// <c>Retry-After</c> (an endpoint without the layer, whose key is ignored; another service's "operation in
    /// progress") says nothing about the request having run: sending it again could run it twice.
    /// </summary>
    private static async Task<bool> IsInProgressProblemAsync(HttpResponseMessage response, CancellationToken cancellationToken)
    {
        if (response.Content.Headers.ContentType?.MediaType != "application/problem+json" || response.Content.Headers.ContentLength > MaxProblemBytes)
        {
            return false;
        }

        try
        {
            if (await ReadProblemAsync(response, cancellationToken).ConfigureAwait(false) is not { } body)
            {
                return false;
            }

            return IsInProgressProblem(body);
        }
        catch
        {
            // The connection failed as the body was read: the caller gets the failure, and the response is let go.
            response.Dispose();
            throw;
        }
    }

    // Not JSON, or a type that is not text (its escapes half a surrogate pair, or its bytes are not UTF-8, which the
    // parser leaves to the string's reading): not the layer's problem, and the caller gets the response as it came.
    private static bool IsInProgressProblem(ReadOnlyMemory<byte> body)
    {
        try
        {
            using var problem = JsonDocument.Parse(body);
            return problem.RootElement.ValueKind == JsonValueKind.Object
                && problem.RootElement.TryGetProperty("type", out var type) && type.ValueKind == JsonValueKind.String
                && type.GetString()!.EndsWith("/request-in-progress", StringComparison.Ordinal);
        }
        catch (Exception ex) when (ex is JsonException or InvalidOperationException)
        {
            return false;
        }
    }

    /// <summary>
    /// Reads the body of <paramref name="response"/> up to a bound, leaving it for the caller to read whole: the body
    /// read, or null when it is larger than any problem of the layer's (its length unknown until read), not the layer's.
    /// </summary>
    private static async Task<ReadOnlyMemory<byte>?> ReadProblemAsync(HttpResponseMessage response, CancellationToken cancellationToken)
    {
        var content = response.Content;
        var stream = await content.ReadAsStreamAsync(cancellationToken).ConfigureAwait(false);
        var read = new byte[MaxProblemBytes + 1];
        var length = 0;
        for (int got; length < read.Length && (got = await stream.ReadAsync(read.AsMemory(length), cancellationToken).ConfigureAwait(false)) > 0;)
        {
            length += got;
        }

        var whole = length <= MaxProblemBytes;
        HttpContent again = whole ? new ByteArrayContent(read, 0, length) : new StreamContent(new ReadAgainStream(read, stream));
        foreach (var header in content.Headers)
        {
            again.Headers.TryAddWithoutValidation(header.Key, header.Value);
        }

        response.Content = again;
        if (whole)
        {
            content.Dispose();
        }

        return whole ? read.AsMemory(0, length) : null;
    }

    /// <summary>
    /// How long to wait before sending the request again, or null to return <paramref name="response"/>. Of the
    /// layer's 409s only "in progress" carries <c>Retry-After</c>; one without it (an unknown outcome, a response too
    /// large to store) will not change by waiting.
    /// </summary>
    private TimeSpan? WaitBeforeAskingAgain(HttpResponseMessage response, DateTimeOffset giveUpAt)
    {
        if (response.StatusCode != HttpStatusCode.Conflict)
        {
            return null;
        }

        var now = time.GetUtcNow();
        TimeSpan? asked = response.Headers.RetryAfter switch
        {
            { Delta: { } delta } => delta,
            // Against the server's clock, when it sent one: the two clocks need not agree.
            { Date: { } date } => date - (response.Headers.Date ?? now),
            _ => null,
        };
        if (asked is not { } wait)
        {
            return null;
        }

        // At most what Task.Delay takes; an endless InProgressWait asks again after that.
        var delay = wait < ShortestWait ? ShortestWait : wait > LongestWait ? LongestWait : wait;
        return now + delay <= giveUpAt ? delay : null;
    }
}
