using OrleansIdempotency.Testing;
using Microsoft.Extensions.Configuration;
using Microsoft.Extensions.DependencyInjection;
using Microsoft.Extensions.Hosting;
using OrleansIdempotency.Grains;
using OrleansIdempotency.Silo.Hosting;

namespace OrleansIdempotency.Silo.Tests;

[Collection(ServersCollection.Name)]
public sealed class SiloFailureTests(ServersFixture servers, Xunit.Abstractions.ITestOutputHelper output)
{
    [Fact]
    public async Task SiloStoppedBetweenClaimAndAnswer_TheSameAttemptAsksAgainAndGetsItsClaim()
    {
        var settings = await TestClusterSettings.CreateAsync(servers);
        var hold = new ClaimAnswerHold();
        var silos = new[]
        {
            await TestSilo.StartAsync(settings, silo => silo.AddIncomingGrainCallFilter(new HoldClaimAnswer(0, hold))),
            await TestSilo.StartAsync(settings, silo => silo.AddIncomingGrainCallFilter(new HoldClaimAnswer(1, hold))),
        };
        try
        {
            await RedisClusteringTests.WaitForActiveSilosAsync(silos[0].Grains, 2);
            var builder = Host.CreateApplicationBuilder(new HostApplicationBuilderSettings { DisableDefaults = true });
            builder.Configuration.AddInMemoryCollection(settings);
            builder.UseOrleansClient(client => client.UseIdempotency(builder.Configuration));
            using var clientHost = builder.Build();
            await clientHost.StartAsync();
            var client = clientHost.Services.GetRequiredService<IClusterClient>();

            var key = new IdempotencyKey("alice", Guid.NewGuid().ToString("N"));
            var request = new ClaimRequest(Guid.NewGuid(), [1, 2, 3], TimeSpan.FromMinutes(5), TimeSpan.FromHours(1));
            var lostAnswer = client.GetIdempotencyGrain(key).ClaimAsync(request);

            // The claim is durable in PostgreSQL; its answer is held on the silo that wrote it, which now dies.
            var holder = await hold.Held.WaitAsync(TimeSpan.FromSeconds(30));
            var clock = System.Diagnostics.Stopwatch.StartNew();
            await silos[holder].CrashAsync();
            output.WriteLine($"crashed after {clock.Elapsed}");
            var lost = await Assert.ThrowsAnyAsync<Exception>(() => lostAnswer.WaitAsync(TimeSpan.FromSeconds(60)));
            output.WriteLine($"lost answer failed after {clock.Elapsed}: {lost.GetType().Name}");

            var recovered = await AskAgainAsync(client.GetIdempotencyGrain(key), request);
            output.WriteLine($"recovered after {clock.Elapsed}");

            Assert.Equal(ClaimOutcome.Acquired, recovered.Outcome);
            Assert.Equal(new ClaimToken(request.AttemptId, 1), recovered.Token);
            var other = await client.GetIdempotencyGrain(key).ClaimAsync(request with { AttemptId = Guid.NewGuid() });
            Assert.Equal(ClaimOutcome.InProgress, other.Outcome);
            await clientHost.StopAsync();
        }
        finally
        {
            hold.Dispose();
            foreach (var silo in silos)
            {
                await silo.DisposeAsync();
            }
        }
    }

    private static async Task<ClaimResult> AskAgainAsync(IIdempotencyGrain grain, ClaimRequest request)
    {
        var deadline = DateTime.UtcNow + TimeSpan.FromSeconds(60);
        while (true)
        {
            try
            {
                return await grain.ClaimAsync(request);
            }
            catch (Exception) when (DateTime.UtcNow < deadline)
            {
                // Until membership declares the dead silo dead, calls may still be routed to it.
                await Task.Delay(250);
            }
        }
    }

    /// <summary>Holds back the answer to the first claim, after the grain has persisted it, and says on which silo.</summary>
    private sealed class ClaimAnswerHold : IDisposable
    {
        private readonly TaskCompletionSource<int> held = new(TaskCreationOptions.RunContinuationsAsynchronously);
        private readonly TaskCompletionSource never = new(TaskCreationOptions.RunContinuationsAsynchronously);
        private int taken;

        public Task<int> Held => held.Task;

        public Task HoldIfFirstAsync(int silo)
        {
            if (Interlocked.Exchange(ref taken, 1) != 0)
            {
                return Task.CompletedTask;
            }

            held.SetResult(silo);
            return never.Task;
        }

        public void Dispose() => never.TrySetCanceled();
    }

    private sealed class HoldClaimAnswer(int silo, ClaimAnswerHold hold) : IIncomingGrainCallFilter
    {
        public async Task Invoke(IIncomingGrainCallContext context)
        {
            await context.Invoke();
            if (context.InterfaceMethod?.Name == nameof(IIdempotencyGrain.ClaimAsync))
            {
                await hold.HoldIfFirstAsync(silo);
            }
        }
    }
}
