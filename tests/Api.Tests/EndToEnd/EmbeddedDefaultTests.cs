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
