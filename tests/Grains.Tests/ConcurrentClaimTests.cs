using Microsoft.Extensions.DependencyInjection;

namespace OrleansIdempotency.Grains.Tests;

[Collection(ClusterCollection.Name)]
public sealed class ConcurrentClaimTests(ClusterFixture fixture)
{
    [Fact]
    public async Task TwoHundredConcurrentClaimsOfOneKey_ExactlyOneProceeds_RepeatedOverTwentyKeys()
    {
        // The claims go out through both silos' gateways, so the callers really are spread over the cluster.
        var silos = fixture.Cluster.Silos.Select(s => s.SiloHost.Services.GetRequiredService<IGrainFactory>()).ToArray();
        for (var round = 0; round < 20; round++)
        {
            var key = new IdempotencyKey("tenant", $"storm-{round}-{Guid.NewGuid():N}");
            var request = new byte[] { 1, 2, 3 };
            using var start = new ManualResetEventSlim();
            var claims = Enumerable.Range(0, 200).Select(i => Task.Run(async () =>
            {
                start.Wait();
                var grains = i % 3 == 0 ? fixture.Grains : silos[i % silos.Length];
                return await grains.GetIdempotencyGrain(key).ClaimAsync(
                    new ClaimRequest(Guid.NewGuid(), request, TimeSpan.FromMinutes(1), TimeSpan.FromHours(1)));
            })).ToArray();
            start.Set();
            var results = await Task.WhenAll(claims);

            Assert.Equal(1, results.Count(r => r.Outcome == ClaimOutcome.Acquired));
            Assert.Equal(199, results.Count(r => r.Outcome == ClaimOutcome.InProgress));
        }
    }
}
