using System.Net;
using System.Net.Http.Json;
using OrleansIdempotency.Testing;

namespace OrleansIdempotency.Api.Tests.EndToEnd;

/// <summary>
/// The first run (DESIGN §7): the demo API with no connection strings, hosting a silo on localhost clustering with
/// in-memory records, through real HTTP.
/// </summary>
public sealed class EmbeddedDefaultTests : IAsyncLifetime
{
    private const int Rounds = 5;
    private const int Parallel = 50;

    private ApiServer api = null!;

    public async Task InitializeAsync() =>
        api = await ApiServer.StartAsync(new Dictionary<string, string?>(FreePort.SiloEndpoints())
        {
            ["Logging:LogLevel:Default"] = "Error",
            // The layer's bound on a body set above the server's.
            ["Kestrel:Limits:MaxRequestBodySize"] = "1000000",
            ["Idempotency:MaxRequestBodyBytes"] = "2000000",
        });

    public async Task DisposeAsync() => await api.DisposeAsync();

    [Fact]
    public async Task NoServers_ParallelDuplicatesOfANewKey_RunOnce_AndAllGetTheSameBytes()
    {
        using var client = api.Client();
        for (var round = 0; round < Rounds; round++)
        {
            var key = Guid.NewGuid().ToString();
            using var start = new ManualResetEventSlim();
            var requests = Enumerable.Range(0, Parallel).Select(_ => Task.Run(async () =>
            {
                start.Wait();
                return await client.SendAsync("/orders", key, Requests.OrderBody, ("X-Demo-Delay-Ms", "200"));
            })).ToArray();
            start.Set();
            var responses = await Task.WhenAll(requests);

            Assert.All(responses, r => Assert.Equal(HttpStatusCode.Created, r.Response.StatusCode));
            Assert.Single(responses, r => !r.Response.IsReplay());
            Assert.Single(responses.Select(r => Convert.ToBase64String(r.Body)).Distinct());
        }

        var orders = await client.GetFromJsonAsync<List<Dictionary<string, object>>>("/orders");
        Assert.Equal(Rounds, orders!.Count);
    }

    [Fact]
    public async Task BodyBoundSetAboveTheServersLimit_IsTheBoundIdempotentRequestsGet()
    {
        using var client = api.Client();
        var withinTheBound = new string('a', 1_500_000);
        var pastTheBound = new string('a', 2_000_001);

        var taken = await client.SendAsync("/bench/idempotent", Guid.NewGuid().ToString(), withinTheBound);
        var claimed = await client.SendAsync($"/once/{Guid.NewGuid()}/claim", null, $"{{\"input\":\"{withinTheBound}\"}}");
        // Refused before the body is read: sent only once the server asks for it (100-continue), or the client would
        // still be sending it when the refusal closes the connection.
        using var refused = await client.SendAsync(ExpectingContinue(Requests.Post("/bench/idempotent", Guid.NewGuid().ToString(), pastTheBound)));
        using var plain = await client.SendAsync(ExpectingContinue(Requests.Post("/bench/plain", null, withinTheBound)));

        Assert.Equal(HttpStatusCode.OK, taken.Response.StatusCode);
        Assert.Equal(withinTheBound.Length, taken.Body.Length);
        Assert.Equal(HttpStatusCode.Created, claimed.Response.StatusCode);
        Assert.Equal(HttpStatusCode.RequestEntityTooLarge, refused.StatusCode);
        Assert.EndsWith("body-too-large", (await refused.Content.ReadFromJsonAsync<System.Text.Json.JsonElement>()).GetProperty("type").GetString());
        // Other requests keep the server's limit.
        Assert.Equal(HttpStatusCode.RequestEntityTooLarge, plain.StatusCode);

        static HttpRequestMessage ExpectingContinue(HttpRequestMessage request)
        {
            request.Headers.ExpectContinue = true;
            return request;
        }
    }

    [Fact]
    public async Task Health_ReportsItsSilo_AndItsActivationsRiseWhileAKeyRuns()
    {
        using var client = api.Client();
        var before = await client.GetFromJsonAsync<Health>("/health");
        Assert.Equal(("ok", 1, (int?)0), (before!.Status, before.ActiveSilos, before.UnresponsiveSilos));
        Assert.True(before.ManagedHeapBytes > 0);

        // A key completed at once deactivates at once; one whose action runs stays activated while it runs.
        var running = client.SendAsync("/orders", Guid.NewGuid().ToString(), Requests.OrderBody, ("X-Demo-Delay-Ms", "3000"));
        var most = before.Activations;
        while (!running.IsCompleted && most <= before.Activations)
        {
            most = Math.Max(most, (await client.GetFromJsonAsync<Health>("/health"))!.Activations);
            await Task.Delay(50);
        }

        Assert.Equal(HttpStatusCode.Created, (await running).Response.StatusCode);
        Assert.True(most > before.Activations, $"{before.Activations} activations before the key, at most {most} while it ran.");
    }

    private sealed record Health(string Status, int ActiveSilos, int? UnresponsiveSilos, long Activations, long ManagedHeapBytes);
}
