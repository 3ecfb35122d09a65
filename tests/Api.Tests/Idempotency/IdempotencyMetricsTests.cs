using Microsoft.AspNetCore.Http;
using Microsoft.Extensions.Diagnostics.Metrics.Testing;

namespace OrleansIdempotency.AspNetCore.Tests;

/// <summary>The layer's meter, as README documents it: <c>idempotency.requests</c> by <c>result</c>.</summary>
[Collection(MiddlewareClusterCollection.Name)]
public sealed class IdempotencyMetricsTests(MiddlewareClusterFixture fixture)
{
    [Fact]
    public async Task EachRequestIsCountedOnce_ByHowItEnded()
    {
        var harness = new MiddlewareHarness(fixture, context =>
            context.Request.Path == "/failing" ? Fail(context) : MiddlewareHarness.Creates()(context));
        using var requests = new MetricCollector<long>(harness.Meters, IdempotencyMetrics.MeterName, "idempotency.requests");
        var key = MiddlewareHarness.NewKey();

        await harness.SendAsync(key);
        await harness.SendAsync(key);
        await harness.SendAsync(key);
        await harness.SendAsync(key, body: "{\"amount\":2}");
        await harness.SendAsync(MiddlewareHarness.NewKey(), path: "/failing");
        await fixture.WhileStoreDownAsync(() => harness.SendAsync(MiddlewareHarness.NewKey()));

        var counted = requests.GetMeasurementSnapshot().GroupBy(m => (string)m.Tags["result"]!).ToDictionary(g => g.Key, g => g.Sum(m => m.Value));
        Assert.Equal(
            new Dictionary<string, long> { ["executed"] = 1, ["replayed"] = 2, ["rejected"] = 1, ["released"] = 1, ["unavailable"] = 1 },
            counted);
    }

    private static Task Fail(HttpContext context)
    {
        context.Response.StatusCode = 500;
        return Task.CompletedTask;
    }
}
