using System.Net;
using System.Net.Http.Json;
using OrleansIdempotency.Faults.Tests.Harness;
using Xunit.Abstractions;

namespace OrleansIdempotency.Faults.Tests.Scenarios;

/// <summary>A silo frozen (SIGSTOP: a long pause, a stalled VM), its connections open but nothing answering.</summary>
[Trait("Category", "Long")]
public sealed class FrozenSiloTests(ITestOutputHelper output)
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
        // as its requests, until the silo is declared dead and the node reads the gateway list again.)
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

    [Fact]
    public async Task SiloFrozenUnderLoad_IsRoutedAroundOnceDeclaredDead_WithinSeconds_AndNoKeyRunsTwice()
    {
        // An API started once both silos are active sends to both gateways from its start.
        await using var cluster = await FaultCluster.StartAsync(silos: 2, apis: 1);
        var api = await cluster.AddApiAsync("api-both-gateways", settings: null);
        using var client = Orders.Client(api);

        // Four new keys a second for 35 s from the freeze; the harness declares a silo dead within a few seconds.
        cluster.Silos[1].Pause();
        var clock = System.Diagnostics.Stopwatch.StartNew();
        var sends = new List<Task<(double SentAt, string Key, HttpStatusCode Status)>>();
        while (clock.Elapsed < TimeSpan.FromSeconds(35))
        {
            for (var i = 0; i < 4; i++)
            {
                var key = "frozen-" + Guid.NewGuid();
                var sentAt = clock.Elapsed.TotalSeconds;
                sends.Add(Task.Run(async () => (sentAt, key, (await Orders.SendAsync(client, key)).Status)));
            }

            await Task.Delay(TimeSpan.FromSeconds(1));
        }

        var answers = await Task.WhenAll(sends);
        var sideEffects = await cluster.SideEffectsAsync("demo_orders", "frozen-");
        var late = answers.Where(a => a.SentAt >= 20).ToList();
        FaultReport.Write(output, $"silo frozen under load: requests={answers.Length} " +
            $"first 20 s: {Describe(answers.Where(a => a.SentAt < 20))}; from 20 s: {Describe(late)}");

        // Orleans' default gateway list refresh (a minute) left half of these answered 503 after 17 s.
        Assert.All(late, a => Assert.Equal(HttpStatusCode.Created, a.Status));
        Assert.All(answers, a => Assert.True(a.Status is HttpStatusCode.Created or HttpStatusCode.ServiceUnavailable, $"{a.Key}: {a.Status}"));
        Assert.All(answers.Where(a => a.Status == HttpStatusCode.Created), a => Assert.Equal(1, sideEffects.GetValueOrDefault(a.Key)));
        Assert.All(sideEffects.Values, count => Assert.Equal(1, count));
    }

    private static string Describe(IEnumerable<(double SentAt, string Key, HttpStatusCode Status)> answers) =>
        string.Join(" ", answers.GroupBy(a => (int)a.Status).OrderBy(g => g.Key).Select(g => $"{g.Key}×{g.Count()}"));

    private static async Task<(HttpStatusCode Status, Health? Health)> HealthAsync(HttpClient client)
    {
        using var response = await client.GetAsync(new Uri("/health", UriKind.Relative));
        return (response.StatusCode, response.IsSuccessStatusCode ? await response.Content.ReadFromJsonAsync<Health>() : null);
    }

    private sealed record Health(string Status, int ActiveSilos, int UnresponsiveSilos);
}
