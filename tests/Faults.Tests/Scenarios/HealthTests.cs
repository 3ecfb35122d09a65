using System.Net;
using System.Net.Http.Json;
using OrleansIdempotency.Faults.Tests.Harness;
using Xunit.Abstractions;

namespace OrleansIdempotency.Faults.Tests.Scenarios;

/// <summary><c>GET /health</c> while a silo is frozen (SIGSTOP) but not yet declared dead.</summary>
[Trait("Category", "Long")]
public sealed class HealthTests(ITestOutputHelper output)
{
    // Failover as slow as Orleans' own defaults, about half a minute: the frozen silo stays active in membership
    // while the test asks.
    private static readonly Dictionary<string, string> SlowFailover = new()
    {
        ["Orleans__Membership__ProbeTimeout"] = "00:00:10",
        ["Orleans__Membership__NumMissedProbesLimit"] = "3",
    };

    [Fact]
    public async Task SiloFrozenButNotDeclaredDead_HealthStaysUp_ReportingItUnresponsive_UntilItAnswersAgain()
    {
        await using var cluster = await FaultCluster.StartAsync(silos: 1, apis: 1, clusterSettings: SlowFailover);
        using var client = new HttpClient { BaseAddress = cluster.Apis[0].BaseAddress, Timeout = TimeSpan.FromSeconds(30) };

        // The API asks through silo0's gateway, which stays up: a client's calls to one grain keep to the gateway they
        // first went through while its connection holds, and the API first asked (starting) when silo0 was the only
        // one. (An API node whose calls go through the frozen silo's gateway stalls with it, its health check as well
        // as its requests, until the silo is declared dead.)
        var frozen = await cluster.AddSiloAsync("silo1");
        frozen.Pause();
        var (status, health) = await HealthAsync(client);
        FaultReport.Write(output, $"health with silo1 frozen: {status} {health}");
        Assert.Equal(HttpStatusCode.OK, status);
        Assert.Equal(new Health("degraded", ActiveSilos: 2, UnresponsiveSilos: 1), health);

        frozen.Resume();
        var deadline = DateTime.UtcNow + TimeSpan.FromSeconds(20);
        do
        {
            (status, health) = await HealthAsync(client);
        }
        while (health != new Health("ok", 2, 0) && DateTime.UtcNow < deadline);

        FaultReport.Write(output, $"health once silo1 resumed: {status} {health}");
        Assert.Equal(new Health("ok", 2, 0), health);
    }

    private static async Task<(HttpStatusCode Status, Health? Health)> HealthAsync(HttpClient client)
    {
        using var response = await client.GetAsync(new Uri("/health", UriKind.Relative));
        return (response.StatusCode, response.IsSuccessStatusCode ? await response.Content.ReadFromJsonAsync<Health>() : null);
    }

    private sealed record Health(string Status, int ActiveSilos, int UnresponsiveSilos);
}
