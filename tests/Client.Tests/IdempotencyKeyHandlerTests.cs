using System.Net;
using System.Net.Http.Headers;
using System.Text;
using Microsoft.Extensions.DependencyInjection;
using Microsoft.Extensions.Time.Testing;

namespace OrleansIdempotency.Client.Tests;

public sealed class IdempotencyKeyHandlerTests
{
    private readonly FakeTimeProvider time = new(new DateTimeOffset(2026, 1, 1, 0, 0, 0, TimeSpan.Zero));

    [Fact]
    public async Task Post_WithoutAKey_GetsAFreshOne_AndTheNextRequestAnother()
    {
        var server = new Server(Created);
        using var client = Client(server);

        await client.PostAsync("/orders", Json());
        await client.PostAsync("/orders", Json());

        Assert.Equal(2, server.Attempts.Count);
        Assert.All(server.Attempts, a => Assert.Matches("^\"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\"$", a.Key));
        Assert.NotEqual(server.Attempts[0].Key, server.Attempts[1].Key);
    }

    [Fact]
    public async Task KeysAreSentAsStructuredFieldStrings_QuotesAndBackslashesEscaped_AndOnesTheServerWouldRefuseAreRefusedFirst()
    {
        var server = new Server(Created);
        using var client = Client(server, new IdempotencyKeyOptions { NewKey = () => "order 7 \"rush\" \\ now" });
        using var unicode = Client(server, new IdempotencyKeyOptions { NewKey = () => "commande-é" });
        using var comma = Client(server, new IdempotencyKeyOptions { NewKey = () => "order,7" });
        using var empty = Client(server, new IdempotencyKeyOptions { NewKey = () => "" });
        using var tooLong = Client(server, new IdempotencyKeyOptions { NewKey = () => new string('k', 256) });

        await client.PostAsync("/orders", Json());

        Assert.Equal("\"order 7 \\\"rush\\\" \\\\ now\"", server.Attempts.Single().Key);
        await Assert.ThrowsAsync<InvalidOperationException>(() => unicode.PostAsync("/orders", Json()));
        await Assert.ThrowsAsync<InvalidOperationException>(() => comma.PostAsync("/orders", Json()));
        await Assert.ThrowsAsync<InvalidOperationException>(() => empty.PostAsync("/orders", Json()));
        await Assert.ThrowsAsync<InvalidOperationException>(() => tooLong.PostAsync("/orders", Json()));
        Assert.Single(server.Attempts);
    }

    [Fact]
    public async Task Patch_WithoutAKey_GetsOne_AsAPostDoes()
    {
        var server = new Server(Created);
        using var client = Client(server);

        await client.PatchAsync("/orders/1", Json());

        Assert.Matches("^\"[0-9a-f-]{36}\"$", server.Attempts.Single().Key);
    }

    [Fact]
    public async Task KeyTheCallerSet_IsKept_AndOtherMethodsGetNone()
    {
        var server = new Server(Created);
        using var client = Client(server);
        using var keyed = new HttpRequestMessage(HttpMethod.Post, "/orders") { Content = Json(), Headers = { { IdempotencyKeyHandler.HeaderName, "mine" } } };

        await client.SendAsync(keyed);
        await client.GetAsync("/orders");
        await client.PutAsync("/orders/1", Json());

        Assert.Equal(["mine", null, null], server.Attempts.Select(a => a.Key));
    }

    [Fact]
    public async Task KeyTheCallerSetOnTheContentsHeaders_IsKept_NotJoinedByASecond()
    {
        var server = new Server(Created);
        using var client = Client(server);
        var content = Json();
        content.Headers.Add(IdempotencyKeyHandler.HeaderName, "mine");

        await client.PostAsync("/orders", content);

        Assert.Equal("mine", server.Attempts.Single().Key);
    }

    [Fact]
    public async Task MethodsChangedAfterTheHandlerWasMade_DoNotChangeWhichRequestsItKeys()
    {
        var server = new Server(Created);
        var options = new IdempotencyKeyOptions();
        using var client = Client(server, options);

        options.Methods.Add(HttpMethod.Put);
        options.Methods.Remove(HttpMethod.Post);
        await client.PutAsync("/orders/1", Json());
        await client.PostAsync("/orders", Json());

        Assert.Null(server.Attempts[0].Key);
        Assert.NotNull(server.Attempts[1].Key);
    }

    [Fact]
    public async Task InProgress409_IsSentAgainAfterRetryAfter_WithTheSameKeyAndTheWholeBody_EvenFromAStream()
    {
        var server = new Server(InProgress(TimeSpan.FromSeconds(2)), Created);
        using var client = Client(server);
        using var body = new StreamContent(new OneWayStream("{\"amount\":5}"u8.ToArray()));

        var sending = client.PostAsync("/orders", body);
        Assert.True(await AdvanceUntilAttemptsAsync(server, 2) >= TimeSpan.FromSeconds(2));
        using var response = await sending.WaitAsync(TimeSpan.FromSeconds(10));

        Assert.Equal(HttpStatusCode.Created, response.StatusCode);
        Assert.Equal(2, server.Attempts.Count);
        Assert.Equal(server.Attempts[0].Key, server.Attempts[1].Key);
        Assert.All(server.Attempts, a => Assert.Equal("{\"amount\":5}", a.Body));
    }

    [Fact]
    public async Task RetryAfterAsADate_IsWaitedUntil()
    {
        var server = new Server(InProgressUntil(time.GetUtcNow() + TimeSpan.FromSeconds(3)), Created);
        using var client = Client(server);

        var sending = client.PostAsync("/orders", Json());
        Assert.True(await AdvanceUntilAttemptsAsync(server, 2) >= TimeSpan.FromSeconds(3));

        Assert.Equal(HttpStatusCode.Created, (await sending.WaitAsync(TimeSpan.FromSeconds(10))).StatusCode);
    }

    [Fact]
    public async Task RetryAfterAsADate_IsReadAgainstTheServersClock_NotTheClients()
    {
        // The client's clock runs 5 s ahead of the server's; the server asks for 2 s.
        var serverNow = time.GetUtcNow() - TimeSpan.FromSeconds(5);
        var server = new Server(
            _ =>
            {
                var inProgress = InProgressProblem(new RetryConditionHeaderValue(serverNow + TimeSpan.FromSeconds(2)));
                inProgress.Headers.Date = serverNow;
                return inProgress;
            },
            Created);
        using var client = Client(server);

        var sending = client.PostAsync("/orders", Json());

        Assert.True(await AdvanceUntilAttemptsAsync(server, 2) >= TimeSpan.FromSeconds(2));
        Assert.Equal(HttpStatusCode.Created, (await sending.WaitAsync(TimeSpan.FromSeconds(10))).StatusCode);
    }

    [Fact]
    public async Task InProgressWaitWithoutEnd_WaitsAsLongAsTheServerAsks_EvenLongerThanOneDelayCanWait()
    {
        var server = new Server(InProgress(TimeSpan.FromDays(60)), Created);
        using var client = Client(server, new IdempotencyKeyOptions { InProgressWait = TimeSpan.MaxValue });

        var sending = client.PostAsync("/orders", Json());
        var waited = TimeSpan.Zero;
        for (; server.Count < 2; waited += TimeSpan.FromDays(1))
        {
            Assert.True(waited < TimeSpan.FromDays(100), "The request was not sent again.");
            time.Advance(TimeSpan.FromDays(1));
            await Task.Delay(5);
        }

        // Asked again after the longest single wait (about 25 days), not 60: still waiting, and never thrown.
        Assert.InRange(waited, TimeSpan.FromDays(24), TimeSpan.FromDays(27));
        Assert.Equal(HttpStatusCode.Created, (await sending.WaitAsync(TimeSpan.FromSeconds(10))).StatusCode);
    }

    [Fact]
    public async Task RetryAfterOfZero_StillWaitsAMoment_InsteadOfLoopingOnTheServer()
    {
        var server = new Server(InProgress(TimeSpan.Zero), Created);
        using var client = Client(server);

        var sending = client.PostAsync("/orders", Json());
        Assert.True(await AdvanceUntilAttemptsAsync(server, 2) >= TimeSpan.FromMilliseconds(100));

        Assert.Equal(HttpStatusCode.Created, (await sending.WaitAsync(TimeSpan.FromSeconds(10))).StatusCode);
    }

    [Fact]
    public async Task ConflictWithoutRetryAfter_OrOnePastTheWait_IsReturnedAsItIs()
    {
        var unknown = new Server(_ => new HttpResponseMessage(HttpStatusCode.Conflict));
        var tooLong = new Server(InProgress(TimeSpan.FromSeconds(31)));
        using var unknownClient = Client(unknown);
        using var tooLongClient = Client(tooLong);

        Assert.Equal(HttpStatusCode.Conflict, (await unknownClient.PostAsync("/orders", Json())).StatusCode);
        Assert.Equal(HttpStatusCode.Conflict, (await tooLongClient.PostAsync("/orders", Json())).StatusCode);
        Assert.Single(unknown.Attempts);
        Assert.Single(tooLong.Attempts);
    }

    public static TheoryData<string?, string> ConflictsNotTheLayersInProgressProblem => new()
    {
        { null, "" },
        { "application/problem+json", "{\"type\":\"https://other.example/problems/operation-in-progress\"}" },
        { "application/json", "{\"type\":\"https://orleans-idempotency.dev/problems/request-in-progress\"}" },
        { "application/problem+json", "not json" },
        // A type that is not text: it escapes half a surrogate pair.
        { "application/problem+json", "{\"type\":\"https://orleans-idempotency.dev/problems/\\ud800/request-in-progress\"}" },
        // Larger than any problem of the layer's: returned whole, not read past its bound.
        { "application/problem+json", "{\"type\":\"https://orleans-idempotency.dev/problems/request-in-progress\",\"detail\":\"" + new string('x', 70_000) + "\"}" },
    };

    [Theory]
    [MemberData(nameof(ConflictsNotTheLayersInProgressProblem))]
    public async Task ConflictWithRetryAfter_NotTheLayersInProgressProblem_IsReturnedAsItIs_NeverSentAgain(string? mediaType, string body)
    {
        // An endpoint without the layer ignores the key: sent again, the request would run again.
        var server = new Server(_ => Conflict(new RetryConditionHeaderValue(TimeSpan.FromSeconds(1)), mediaType, body), Created);
        using var client = Client(server);

        var response = await client.PostAsync("/orders", Json());

        Assert.Equal(HttpStatusCode.Conflict, response.StatusCode);
        Assert.Equal(body, await response.Content.ReadAsStringAsync());
        Assert.Single(server.Attempts);
    }

    [Fact]
    public async Task LargeConflictOfUnknownLength_IsReturnedWhole_NotReadPastItsBound()
    {
        // Chunked, or decompressed: its length is known only once read.
        var body = "{\"type\":\"https://other.example/problems/busy\",\"detail\":\"" + new string('x', 70_000) + "\"}";
        var server = new Server(_ => new HttpResponseMessage(HttpStatusCode.Conflict)
        {
            Headers = { RetryAfter = new RetryConditionHeaderValue(TimeSpan.FromSeconds(1)) },
            Content = new StreamContent(new OneWayStream(Encoding.UTF8.GetBytes(body))) { Headers = { ContentType = new MediaTypeHeaderValue("application/problem+json") } },
        }, Created);
        using var client = Client(server);

        var response = await client.PostAsync("/orders", Json());

        Assert.Equal(HttpStatusCode.Conflict, response.StatusCode);
        Assert.Equal("application/problem+json", response.Content.Headers.ContentType?.MediaType);
        Assert.Equal(body, await response.Content.ReadAsStringAsync());
        Assert.Single(server.Attempts);
    }

    [Fact]
    public async Task ConflictWhoseBodyFailsAsItIsRead_FailsTheRequest_AndLetsTheResponseGo()
    {
        var body = new BrokenStream();
        var server = new Server(_ => new HttpResponseMessage(HttpStatusCode.Conflict)
        {
            Headers = { RetryAfter = new RetryConditionHeaderValue(TimeSpan.FromSeconds(1)) },
            Content = new StreamContent(body) { Headers = { ContentType = new MediaTypeHeaderValue("application/problem+json") } },
        }, Created);
        using var client = Client(server);

        await Assert.ThrowsAsync<IOException>(() => client.PostAsync("/orders", Json()));

        Assert.True(body.Disposed);
        Assert.Single(server.Attempts);
    }

    [Fact]
    public async Task CancellationWhileWaiting_EndsTheRequest()
    {
        var server = new Server(InProgress(TimeSpan.FromSeconds(5)));
        using var client = Client(server);
        using var cancel = new CancellationTokenSource();

        var sending = client.PostAsync("/orders", Json(), cancel.Token);
        await server.WaitForAttemptsAsync(1);
        await cancel.CancelAsync();

        await Assert.ThrowsAnyAsync<OperationCanceledException>(() => sending.WaitAsync(TimeSpan.FromSeconds(10)));
        Assert.Single(server.Attempts);
    }

    [Fact]
    public async Task SynchronousSend_IsKeyedAndWaitsToo()
    {
        var server = new Server(InProgress(TimeSpan.FromSeconds(1)), Created);
        using var client = Client(server);
        using var request = new HttpRequestMessage(HttpMethod.Post, "/orders") { Content = Json() };

        var sending = Task.Run(() => client.Send(request));
        Assert.True(await AdvanceUntilAttemptsAsync(server, 2) >= TimeSpan.FromSeconds(1));
        using var response = await sending.WaitAsync(TimeSpan.FromSeconds(10));

        Assert.Equal(HttpStatusCode.Created, response.StatusCode);
        Assert.Equal(server.Attempts[0].Key, server.Attempts[1].Key);
        Assert.NotNull(server.Attempts[0].Key);
    }

    [Fact]
    public void SynchronousSend_OfARequestThatGetsNoKey_TakesTheInnerHandlersSynchronousPath()
    {
        var server = new Server(Created);
        using var client = Client(server);
        using var get = new HttpRequestMessage(HttpMethod.Get, "/orders");
        using var post = new HttpRequestMessage(HttpMethod.Post, "/orders") { Content = Json() };

        client.Send(get).Dispose();
        client.Send(post).Dispose();

        // A GET blocks no second thread; a keyed POST goes the asynchronous way, which keys and waits.
        Assert.Equal([(null, true), (server.Attempts[1].Key, false)], server.Attempts.Select(a => (a.Key, a.Synchronous)));
        Assert.NotNull(server.Attempts[1].Key);
    }

    [Fact]
    public async Task SynchronousSend_FromAThreadWhoseContextIsBlocked_DoesNotDeadlock()
    {
        // A UI thread or classic ASP.NET: the caller's SynchronizationContext runs nothing while Send blocks it.
        var server = new Server(Created) { AnswersLater = true };
        using var client = Client(server);
        using var request = new HttpRequestMessage(HttpMethod.Post, "/orders") { Content = Json() };
        var sent = new TaskCompletionSource<HttpStatusCode>(TaskCreationOptions.RunContinuationsAsynchronously);
        var thread = new Thread(() =>
        {
            SynchronizationContext.SetSynchronizationContext(new BlockedContext());
            try
            {
                sent.SetResult(client.Send(request).StatusCode);
            }
            catch (Exception ex)
            {
                sent.SetException(ex);
            }
        }) { IsBackground = true };
        thread.Start();

        Assert.Equal(HttpStatusCode.Created, await sent.Task.WaitAsync(TimeSpan.FromSeconds(10)));
    }

    [Fact]
    public async Task KeyedContentOverTheBufferBound_FailsBeforeAnythingIsSent_WhetherItsLengthIsKnownOrNot()
    {
        var server = new Server(Created);
        using var client = Client(server, new IdempotencyKeyOptions { MaxBufferedContentBytes = 12 });
        var thirteen = "{\"amount\":50}"u8.ToArray();

        var known = await Assert.ThrowsAsync<InvalidOperationException>(() => client.PostAsync("/orders", new ByteArrayContent(thirteen)));
        var streamed = await Assert.ThrowsAsync<InvalidOperationException>(() => client.PostAsync("/orders", new StreamContent(new OneWayStream(thirteen))));
        await client.PostAsync("/orders", new StreamContent(new OneWayStream(thirteen[..12])));
        await client.PutAsync("/orders/1", new ByteArrayContent(thirteen));

        Assert.Contains(nameof(IdempotencyKeyOptions.MaxBufferedContentBytes), known.Message, StringComparison.Ordinal);
        Assert.Contains(nameof(IdempotencyKeyOptions.MaxBufferedContentBytes), streamed.Message, StringComparison.Ordinal);
        Assert.Equal(["{\"amount\":50", "{\"amount\":50}"], server.Attempts.Select(a => a.Body));
    }

    [Fact]
    public void NegativeInProgressWait_OrBufferBound_IsRefused()
    {
        Assert.Throws<ArgumentOutOfRangeException>(() => new IdempotencyKeyHandler(new IdempotencyKeyOptions { InProgressWait = TimeSpan.FromSeconds(-1) }));
        Assert.Throws<ArgumentOutOfRangeException>(() => new IdempotencyKeyHandler(new IdempotencyKeyOptions { MaxBufferedContentBytes = -1 }));
        Assert.Throws<ArgumentOutOfRangeException>(() => new IdempotencyKeyHandler(new IdempotencyKeyOptions { MaxBufferedContentBytes = int.MaxValue + 1L }));
    }

    [Fact]
    public void OptionsNoHandlerCanUse_AreRefusedWhereTheyAreRegistered_NotAtTheFirstRequest()
    {
        var services = new ServiceCollection();

        Assert.Throws<ArgumentOutOfRangeException>(() => services.AddHttpClient("payments").AddIdempotencyKeys(new IdempotencyKeyOptions { InProgressWait = TimeSpan.FromSeconds(-1) }));
        Assert.Throws<ArgumentNullException>(() => services.AddHttpClient("orders").AddIdempotencyKeys(new IdempotencyKeyOptions { NewKey = null! }));
    }

    /// <summary>Moves the clock on in small steps until <paramref name="count"/> attempts arrived; returns how far it moved.</summary>
    private async Task<TimeSpan> AdvanceUntilAttemptsAsync(Server server, int count)
    {
        var step = TimeSpan.FromMilliseconds(50);
        var moved = TimeSpan.Zero;
        var deadline = DateTime.UtcNow + TimeSpan.FromSeconds(10);
        while (server.Count < count)
        {
            Assert.True(DateTime.UtcNow < deadline, "The attempts did not arrive.");
            time.Advance(step);
            moved += step;
            await Task.Delay(5);
        }

        return moved;
    }

    private HttpClient Client(Server server, IdempotencyKeyOptions? options = null) =>
        new(new IdempotencyKeyHandler(options ?? new IdempotencyKeyOptions(), time) { InnerHandler = server }) { BaseAddress = new Uri("http://api.test") };

    private static StringContent Json() => new("{\"amount\":5}", Encoding.UTF8, "application/json");

    private static HttpResponseMessage Created(HttpRequestMessage request) => new(HttpStatusCode.Created);

    private static Func<HttpRequestMessage, HttpResponseMessage> InProgress(TimeSpan retryAfter) =>
        _ => InProgressProblem(new RetryConditionHeaderValue(retryAfter));

    private static Func<HttpRequestMessage, HttpResponseMessage> InProgressUntil(DateTimeOffset date) =>
        _ => InProgressProblem(new RetryConditionHeaderValue(date));

    // The layer's answer for a key in progress, as IdempotencyProblems writes it.
    private static HttpResponseMessage InProgressProblem(RetryConditionHeaderValue retryAfter) =>
        Conflict(retryAfter, "application/problem+json", "{\"type\":\"https://orleans-idempotency.dev/problems/request-in-progress\",\"status\":409}");

    private static HttpResponseMessage Conflict(RetryConditionHeaderValue? retryAfter, string? mediaType = null, string body = "") => new(HttpStatusCode.Conflict)
    {
        Headers = { RetryAfter = retryAfter },
        Content = mediaType is null ? null : new StringContent(body, Encoding.UTF8, mediaType),
    };

    /// <summary>Answers attempts in turn with the given responses (the last one repeats), recording each attempt's key and body.</summary>
    private sealed class Server(params Func<HttpRequestMessage, HttpResponseMessage>[] answers) : HttpMessageHandler
    {
        private readonly SemaphoreSlim arrived = new(0);

        public List<(string? Key, string Body, bool Synchronous)> Attempts { get; } = [];

        /// <summary>Answers on another thread, a moment later, as a network does.</summary>
        public bool AnswersLater { get; init; }

        public int Count
        {
            get
            {
                lock (Attempts)
                {
                    return Attempts.Count;
                }
            }
        }

        public async Task WaitForAttemptsAsync(int count)
        {
            for (var i = 0; i < count; i++)
            {
                Assert.True(await arrived.WaitAsync(TimeSpan.FromSeconds(10)), "No attempt arrived.");
            }
        }

        protected override async Task<HttpResponseMessage> SendAsync(HttpRequestMessage request, CancellationToken cancellationToken)
        {
            if (AnswersLater)
            {
                // Resuming on the caller's context, as an inner handler written without ConfigureAwait(false) does.
                await Task.Delay(10, cancellationToken);
            }

            return Answer(request, request.Content is null ? "" : await request.Content.ReadAsStringAsync(cancellationToken), synchronous: false);
        }

        protected override HttpResponseMessage Send(HttpRequestMessage request, CancellationToken cancellationToken) =>
            Answer(request, request.Content is null ? "" : new StreamReader(request.Content.ReadAsStream(cancellationToken)).ReadToEnd(), synchronous: true);

        private HttpResponseMessage Answer(HttpRequestMessage request, string body, bool synchronous)
        {
            lock (Attempts)
            {
                Attempts.Add((KeysOf(request), body, synchronous));
                var response = answers[Math.Min(Attempts.Count, answers.Length) - 1](request);
                arrived.Release();
                return response;
            }
        }
    }

    // Every Idempotency-Key field the request goes out with, the content's included (HttpClient sends both), joined.
    private static string? KeysOf(HttpRequestMessage request)
    {
        var keys = (request.Headers.TryGetValues(IdempotencyKeyHandler.HeaderName, out var found) ? found : [])
            .Concat(request.Content is not null && request.Content.Headers.TryGetValues(IdempotencyKeyHandler.HeaderName, out var onContent) ? onContent : [])
            .ToList();
        return keys.Count == 0 ? null : string.Join(" | ", keys);
    }

    /// <summary>The context of a thread that is blocked: what is posted to it never runs.</summary>
    private sealed class BlockedContext : SynchronizationContext
    {
        public override void Post(SendOrPostCallback d, object? state)
        {
        }
    }

    /// <summary>A body whose connection breaks as it is read.</summary>
    private sealed class BrokenStream : MemoryStream
    {
        public bool Disposed { get; private set; }

        public override int Read(byte[] buffer, int offset, int count) => throw new IOException("The connection was reset.");

        public override ValueTask<int> ReadAsync(Memory<byte> buffer, CancellationToken cancellationToken = default) =>
            throw new IOException("The connection was reset.");

        protected override void Dispose(bool disposing)
        {
            Disposed = true;
            base.Dispose(disposing);
        }
    }

    /// <summary>A body that can be read once, front to back, as a network stream can.</summary>
    private sealed class OneWayStream(byte[] bytes) : MemoryStream(bytes)
    {
        public override bool CanSeek => false;

        public override long Seek(long offset, SeekOrigin loc) => throw new NotSupportedException();

        public override long Position
        {
            get => throw new NotSupportedException();
            set => throw new NotSupportedException();
        }
    }
}
