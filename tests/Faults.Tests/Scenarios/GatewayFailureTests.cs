using System.Collections.Concurrent;
using System.Globalization;
using System.Net;
using System.Net.Http.Headers;
using System.Text.Json;
using Microsoft.AspNetCore.Builder;
using Microsoft.AspNetCore.Hosting;
using Microsoft.AspNetCore.Http;
using OrleansIdempotency.Faults.Tests.Harness;
using OrleansIdempotency.Testing;
using Xunit.Abstractions;

namespace OrleansIdempotency.Faults.Tests.Scenarios;

/// <summary>
/// DESIGN §6 for the gateway: the proxy process killed while its backend (another program, which does not stop when its
/// caller goes away) runs the requests.
/// </summary>
[Trait("Category", "Long")]
public sealed class GatewayFailureTests(ITestOutputHelper output) : IAsyncLifetime
{
    private const int Keys = 10;

    private readonly ConcurrentDictionary<string, int> runs = new();
    private readonly Uri backend = new($"http://127.0.0.1:{FreePort.Next().ToString(CultureInfo.InvariantCulture)}/");
    private WebApplication backendApp = null!;

    public async Task InitializeAsync()
    {
        var builder = WebApplication.CreateSlimBuilder();
        builder.WebHost.UseUrls(backend.ToString());
        backendApp = builder.Build();
        backendApp.MapPost("/charges", async context =>
        {
            var run = runs.AddOrUpdate(context.Request.Headers["Idempotency-Key"].ToString(), 1, (_, n) => n + 1);
            await Task.Delay(TimeSpan.FromSeconds(4), CancellationToken.None);
            context.Response.StatusCode = StatusCodes.Status201Created;
            await context.Response.WriteAsJsonAsync(new { id = Guid.NewGuid(), run }, CancellationToken.None);
        });
        await backendApp.StartAsync();
    }

    public async Task DisposeAsync() => await backendApp.DisposeAsync();

    [Fact]
    public async Task GatewayKilledWhileItsBackendRuns_RetriesGetOutcomeUnknown_AndWithTheOptInTheBackendRunsOnceMore()
    {
        await using var cluster = await FaultCluster.StartAsync(silos: 2, apis: 0);

        // Default: the backend ran once; whether it took effect is unknown to the gateway, so it is never run again.
        var gateway = await cluster.AddApiAsync("gateway", Settings(lapsed: "OutcomeUnknown"));
        var unknown = await KillMidProxyAsync(cluster, gateway, "gw-unknown-");
        FaultReport.Write(output, $"gateway kill -9 mid-proxy: keys={Keys} backend-runs={Runs("gw-unknown-")} answers={Describe(unknown)}");
        Assert.All(unknown, a => Assert.Equal("409 outcome-unknown", a));
        Assert.All(Enumerable.Range(0, Keys), i => Assert.Equal(1, runs.GetValueOrDefault("gw-unknown-" + i)));

        // Opt-in (at-least-once): the lapsed key is sent to the backend once more, whatever the number of retries.
        var reclaiming = await cluster.AddApiAsync("gateway-reclaim", Settings(lapsed: "Reclaim"));
        var rerun = await KillMidProxyAsync(cluster, reclaiming, "gw-rerun-");
        FaultReport.Write(output, $"gateway kill -9 mid-proxy (rerun): keys={Keys} backend-runs={Runs("gw-rerun-")} answers={Describe(rerun)}");
        Assert.All(rerun, a => Assert.StartsWith("201 ", a, StringComparison.Ordinal));
        Assert.All(Enumerable.Range(0, Keys), i => Assert.Equal(2, runs.GetValueOrDefault("gw-rerun-" + i)));
        Assert.Equal(Keys, rerun.Distinct().Count());
    }

    private Dictionary<string, string> Settings(string lapsed) => new()
    {
        ["Idempotency__Lease"] = "00:00:03",
        ["Idempotency__OnLapsedLease"] = lapsed,
        ["ReverseProxy__Clusters__backend__Destinations__one__Address"] = backend.ToString(),
        ["ReverseProxy__Routes__charges__ClusterId"] = "backend",
        ["ReverseProxy__Routes__charges__Match__Path"] = "/charges",
        ["ReverseProxy__Routes__charges__Metadata__Idempotency"] = "Default",
    };

    // Each key's five concurrent retries after the kill, as "status problem-or-body"; every key's retries must agree.
    private async Task<string[]> KillMidProxyAsync(FaultCluster cluster, NodeProcess gateway, string prefix)
    {
        using var client = new HttpClient { BaseAddress = gateway.BaseAddress, Timeout = TimeSpan.FromSeconds(30) };
        client.DefaultRequestHeaders.Authorization = new AuthenticationHeaderValue("Bearer", "caller-1");
        var inFlight = Enumerable.Range(0, Keys).Select(i => SendAsync(client, prefix + i)).ToArray();
        for (var waited = 0; Runs(prefix) < Keys; waited += 50)
        {
            Assert.True(waited < 20_000, $"the backend saw {Runs(prefix)} of {Keys} requests");
            await Task.Delay(50);
        }

        await gateway.KillAsync();
        await Assert.ThrowsAnyAsync<Exception>(() => Task.WhenAll(inFlight));
        gateway.Start();
        await cluster.WaitUntilServingAsync(cluster.Silos.Count, TimeSpan.FromSeconds(60), gateway);
        await Task.Delay(TimeSpan.FromSeconds(5));

        var answers = new List<string>();
        foreach (var key in Enumerable.Range(0, Keys).Select(i => prefix + i))
        {
            var retries = await Task.WhenAll(Enumerable.Range(0, 5).Select(_ => SendAsync(client, key)));
            Assert.Single(retries.Distinct());
            answers.Add(retries[0]);
        }

        return [.. answers];
    }

    private static async Task<string> SendAsync(HttpClient client, string key)
    {
        using var request = new HttpRequestMessage(HttpMethod.Post, "/charges") { Content = new StringContent("{\"amount\":5}") };
        request.Headers.Add("Idempotency-Key", key);
        using var response = await client.SendAsync(request);
        var body = await response.Content.ReadAsStringAsync();
        var answer = response.Content.Headers.ContentType?.MediaType == "application/problem+json"
            ? JsonDocument.Parse(body).RootElement.GetProperty("type").GetString()!.Split('/')[^1]
            : body;
        return $"{(int)response.StatusCode} {answer}";
    }

    private int Runs(string prefix) => runs.Where(r => r.Key.StartsWith(prefix, StringComparison.Ordinal)).Sum(r => r.Value);

    private static string Describe(string[] answers) =>
        string.Join(", ", answers.GroupBy(a => a.Split(' ')[0] + " " + (a.Contains('{', StringComparison.Ordinal) ? "body" : a.Split(' ')[1])).Select(g => $"{g.Key}×{g.Count()}"));
}
