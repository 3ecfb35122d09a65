using Microsoft.AspNetCore.Http;
using Microsoft.Extensions.Diagnostics.Metrics.Testing;
using OrleansIdempotency.Grains;

namespace OrleansIdempotency.AspNetCore.Tests;

/// <summary>How long a key's claim and record last through the middleware: the endpoint's retention, a client gone early.</summary>
[Collection(MiddlewareClusterCollection.Name)]
public sealed class ClaimLifetimeTests(MiddlewareClusterFixture fixture)
{
    [Fact]
    public async Task EndpointsOwnRetention_KeepsItsKeyThatLong_ThenTheKeyRunsAgain()
    {
        var retention = TimeSpan.FromHours(1);
        var harness = new MiddlewareHarness(fixture, MiddlewareHarness.Creates(), IdempotencyPolicy.Default with { Retention = retention });
        var key = MiddlewareHarness.NewKey();
        Assert.Equal(201, (await harness.SendAsync(key)).Response.StatusCode);

        fixture.Time.Advance(retention - TimeSpan.FromMinutes(1));
        var replay = await harness.SendAsync(key);
        fixture.Time.Advance(TimeSpan.FromMinutes(2));
        var afterRetention = await harness.SendAsync(key);

        Assert.Equal("true", replay.Response.Headers["Idempotent-Replayed"]);
        Assert.Equal(201, afterRetention.Response.StatusCode);
        Assert.False(afterRetention.Response.Headers.ContainsKey("Idempotent-Replayed"));
        Assert.Equal(2, harness.Executions);
    }

    [Fact]
    public async Task ClaimWrittenByAnotherActivation_WhoseAnswerWasLost_IsFoundWhenAskedAgain_NotRefusedFromAStaleCopy()
    {
        // The first request fails retryably once let go; the second is created.
        var firstRuns = new TaskCompletionSource();
        var letGo = new TaskCompletionSource();
        var runs = 0;
        var harness = new MiddlewareHarness(fixture, async context =>
        {
            if (Interlocked.Increment(ref runs) == 1)
            {
                firstRuns.SetResult();
                await letGo.Task;
                context.Response.StatusCode = 503;
                return;
            }

            await MiddlewareHarness.Creates()(context);
        }, IdempotencyPolicy.Default with { ConcurrentDuplicates = ConcurrentDuplicateHandling.Reject });
        var key = MiddlewareHarness.NewKey();
        var grain = harness.Grain(key);
        var first = harness.SendAsync(key);
        await firstRuns.Task.WaitAsync(TimeSpan.FromSeconds(10));
        var held = await grain.GetAsync();

        // While membership changes, another activation of the key takes the first attempt's release and then the
        // second request's claim, whose answer is lost; this activation's copy still shows the first attempt's claim.
        fixture.Store.ClaimNextElsewhere(grain.GetGrainId(), request => fixture.ReleaseAndClaimElsewhereAsync(grain, held.AttemptId, request));

        var second = await harness.SendAsync(key);
        letGo.SetResult();
        await first;

        // Asked again, the claim written elsewhere is its own: it runs, rather than a 409 while its claim, held by no
        // one, lapses into an unknown outcome.
        Assert.Equal(201, second.Response.StatusCode);
        Assert.Equal(IdempotencyStatus.Completed, (await grain.GetAsync()).Status);
        Assert.Equal("true", (await harness.SendAsync(key)).Response.Headers["Idempotent-Replayed"]);
        Assert.Equal(2, runs);
    }

    [Fact]
    public async Task ClientThatLeavesWhileItsClaimIsWritten_GetsNoAnswer_NothingRuns_AndItsRetryRunsAtOnce()
    {
        var harness = new MiddlewareHarness(fixture, MiddlewareHarness.Creates());
        var key = MiddlewareHarness.NewKey();
        var grain = harness.Grain(key);
        using var leaving = new CancellationTokenSource();
        fixture.Store.BeforeNextWrite(grain.GetGrainId(), () => leaving.CancelAsync());

        using var requests = new MetricCollector<long>(harness.Meters, IdempotencyMetrics.MeterName, "idempotency.requests");

        var left = await harness.SendAsync(MiddlewareHarness.Request(key, configure: context => context.RequestAborted = leaving.Token));
        Assert.Equal("abandoned", Assert.Single(requests.GetMeasurementSnapshot()).Tags["result"]);
        Assert.Equal(0, harness.Executions);
        Assert.Null(left.Response.ContentType);
        Assert.Empty(left.BodyBytes());

        // No lease has to lapse: the claim written for the client that left is given back.
        await MiddlewareHarness.WaitUntilAsync(async () => (await grain.GetAsync()).Status != IdempotencyStatus.InProgress);
        Assert.Equal(201, (await harness.SendAsync(key)).Response.StatusCode);
        Assert.Equal(1, harness.Executions);
    }
}
