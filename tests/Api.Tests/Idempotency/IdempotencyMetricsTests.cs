using Microsoft.AspNetCore.Http;
using Microsoft.Extensions.Diagnostics.Metrics.Testing;
using Microsoft.Extensions.Logging;
using Microsoft.Extensions.Logging.Testing;

namespace OrleansIdempotency.AspNetCore.Tests;

/// <summary>The layer's meter, as README documents it: <c>idempotency.requests</c> by <c>result</c>.</summary>
[Collection(MiddlewareClusterCollection.Name)]
public sealed class IdempotencyMetricsTests(MiddlewareClusterFixture fixture)
{
    [Fact]
    public async Task EachRequestIsCountedOnce_ByHowItEnded()
    {
        var log = new FakeLogger<IdempotencyMiddleware>();
        var problemsLog = new FakeLogger<IdempotencyProblems>();
        var harness = new MiddlewareHarness(fixture, context => context.Request.Path.Value switch
        {
            "/failing" => Fail(context),
            "/thrown-mid-body" => ThrowMidBodyAsync(context),
            "/short" => WriteShortOfItsLengthAsync(context),
            _ => MiddlewareHarness.Creates()(context),
        }, log: log, problemsLog: problemsLog);
        using var requests = new MetricCollector<long>(harness.Meters, IdempotencyMetrics.MeterName, "idempotency.requests");
        var key = MiddlewareHarness.NewKey();

        await harness.SendAsync(key);
        await harness.SendAsync(key);
        await harness.SendAsync(key);
        await harness.SendAsync(key, body: "{\"amount\":2}");
        await harness.SendAsync(MiddlewareHarness.NewKey(), path: "/failing");
        var whileDown = MiddlewareHarness.NewKey();
        await fixture.WhileStoreDownAsync(() => harness.SendAsync(whileDown));
        // Ran, may have taken effect, and left no outcome: the keys an operator must settle.
        await Assert.ThrowsAsync<InvalidOperationException>(() => harness.SendAsync(MiddlewareHarness.NewKey(), path: "/thrown-mid-body"));
        await harness.SendAsync(MiddlewareHarness.NewKey(), path: "/short");

        // The refusal names the key with its scope, as every other line does.
        Assert.Contains(problemsLog.Collector.GetSnapshot(), r => r.Level == LogLevel.Warning
            && r.Message.Contains(new Grains.IdempotencyKey("user:alice", whileDown).ToString(), StringComparison.Ordinal));
        // Each in doubt is logged, naming the key and why, for the operator who must settle it.
        Assert.Equal(
            ["the action threw InvalidOperationException once its response had begun", "a body short of its Content-Length"],
            log.Collector.GetSnapshot().Where(r => r.Level == LogLevel.Warning && r.Message.Contains("left in doubt", StringComparison.Ordinal))
                .Select(r => r.StructuredState!.Single(p => p.Key == "Reason").Value));
        var counted = requests.GetMeasurementSnapshot().GroupBy(m => (string)m.Tags["result"]!).ToDictionary(g => g.Key, g => g.Sum(m => m.Value));
        Assert.Equal(
            new Dictionary<string, long> { ["executed"] = 1, ["replayed"] = 2, ["rejected"] = 1, ["released"] = 1, ["unavailable"] = 1, ["in_doubt"] = 2 },
            counted);
    }

    [Fact]
    public async Task ActionWhoseLeaseLapsedUnderIt_IsCountedInDoubt_NotExecuted()
    {
        // A pause (a stop-the-world collection, a frozen VM) longer than the lease: its completion is refused.
        var paused = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
        var harness = new MiddlewareHarness(fixture, MiddlewareHarness.CreatesAfter(paused.Task));
        using var requests = new MetricCollector<long>(harness.Meters, IdempotencyMetrics.MeterName, "idempotency.requests");
        var key = MiddlewareHarness.NewKey();

        var running = harness.SendAsync(key);
        await MiddlewareHarness.WaitUntilAsync(async () => (await harness.Grain(key).GetAsync()).Status == Grains.IdempotencyStatus.InProgress);
        fixture.Time.Advance(IdempotencyPolicy.Default.Lease + TimeSpan.FromSeconds(1));
        paused.SetResult();
        await running;

        var counted = Assert.Single(requests.GetMeasurementSnapshot());
        Assert.Equal("in_doubt", counted.Tags["result"]);
        var retry = await harness.SendAsync(key);
        Assert.EndsWith("/outcome-unknown", retry.Problem().GetProperty("type").GetString());
    }

    private static async Task ThrowMidBodyAsync(HttpContext context)
    {
        await context.Response.WriteAsync("{\"id\":");
        await context.Response.Body.FlushAsync();
        throw new InvalidOperationException("failed once the response had begun");
    }

    private static async Task WriteShortOfItsLengthAsync(HttpContext context)
    {
        context.Response.ContentLength = 10;
        await context.Response.WriteAsync("{}");
    }

    private static Task Fail(HttpContext context)
    {
        context.Response.StatusCode = 500;
        return Task.CompletedTask;
    }
}
