using System.Net;

namespace OrleansIdempotency.Api.Tests.EndToEnd;

/// <summary>Many parallel requests with one new key, through real HTTP: the action runs once; everyone agrees.</summary>
[Collection(EndToEndCollection.Name)]
public sealed class ConcurrencyTests(EndToEndFixture fixture)
{
    private const int Parallel = 200;
    private const int Keys = 20;

    [Fact]
    public async Task TwoHundredParallelOrders_OneNewKey_RunOnce_AndAllGetTheSameBytes_OverTwentyKeys()
    {
        using var client = fixture.Api.Client();
        for (var round = 0; round < Keys; round++)
        {
            var key = Guid.NewGuid().ToString();
            var responses = await StormAsync(client, "/orders", key, Requests.OrderBody);

            Assert.All(responses, r => Assert.Equal(HttpStatusCode.Created, r.Response.StatusCode));
            var first = Assert.Single(responses, r => !r.Response.IsReplay());
            Assert.Single(responses.Select(r => Convert.ToBase64String(r.Body)).Distinct());
            Assert.Equal(1, await fixture.CountAsync("demo_orders", key));
            // Duplicates of the key in flight, not later retries: sent before its action had answered, they waited for it.
            Assert.Contains(responses, r => r.Response.IsReplay() && r.SentAt < first.AnsweredAt);
        }
    }

    [Fact]
    public async Task TwoHundredParallelPayments_InRejectMode_RunOnce_OthersGet409OrTheSameBytes_OverTwentyKeys()
    {
        using var client = fixture.Api.Client();
        for (var round = 0; round < Keys; round++)
        {
            var key = Guid.NewGuid().ToString();
            var responses = await StormAsync(client, "/payments", key, Requests.PaymentBody);

            var created = responses.Where(r => r.Response.StatusCode == HttpStatusCode.Created).ToArray();
            var conflicts = responses.Where(r => r.Response.StatusCode == HttpStatusCode.Conflict).ToArray();
            Assert.Equal(Parallel, created.Length + conflicts.Length);
            Assert.Single(created, r => !r.Response.IsReplay());
            Assert.Single(created.Select(r => Convert.ToBase64String(r.Body)).Distinct());
            Assert.NotEmpty(conflicts);
            Assert.All(conflicts, r => Assert.Equal("1", r.Response.Headers.GetValues("Retry-After").Single()));
            Assert.Equal(1, await fixture.CountAsync("demo_payments", key));
        }
    }

    // Each response with when it was sent and answered (one stopwatch's time).
    private static async Task<(HttpResponseMessage Response, byte[] Body, TimeSpan SentAt, TimeSpan AnsweredAt)[]> StormAsync(HttpClient client, string path, string key, string body)
    {
        using var start = new ManualResetEventSlim();
        var clock = System.Diagnostics.Stopwatch.StartNew();
        // The first request's action sleeps, so the other 199 really overlap it.
        var requests = Enumerable.Range(0, Parallel).Select(_ => Task.Run(async () =>
        {
            start.Wait();
            var sentAt = clock.Elapsed;
            var (response, answer) = await client.SendAsync(path, key, body, ("X-Demo-Delay-Ms", "300"));
            return (response, answer, sentAt, clock.Elapsed);
        })).ToArray();
        start.Set();
        return await Task.WhenAll(requests);
    }
}
