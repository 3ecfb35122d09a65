using System.Diagnostics;
using System.Globalization;
using Microsoft.Extensions.Configuration;
using Microsoft.Extensions.DependencyInjection;
using Microsoft.Extensions.Hosting;
using Microsoft.Extensions.Logging;
using OrleansIdempotency.Grains;
using OrleansIdempotency.Silo.Hosting;
using OrleansIdempotency.Testing;

namespace OrleansIdempotency.Bench;

/// <summary>
/// The key grain in-process, without HTTP: the claim → complete → replay cycle, and the managed memory a key costs
/// while activated and after its activation is collected (in-memory storage, so the record itself stays in memory).
/// </summary>
public static class GrainBenchmark
{
    public static async Task RunAsync(int keys)
    {
        var builder = Host.CreateApplicationBuilder(new HostApplicationBuilderSettings { DisableDefaults = true });
        builder.Logging.SetMinimumLevel(LogLevel.Warning);
        // Through the same hosting as the demo API, so that what is measured runs with its silo settings (the activation
        // collection age, the directory-cache bound). Its warning about in-memory records is logged once per run.
        builder.Configuration.AddInMemoryCollection(FreePort.SiloEndpoints());
        builder.UseOrleans(silo => silo.UseIdempotency(builder.Configuration));
        using var host = builder.Build();
        await host.StartAsync();
        var grains = host.Services.GetRequiredService<IGrainFactory>();
        var response = new StoredResponse(201, [new("Content-Type", "application/json")], new byte[200], false, 200);

        // Warm-up: the JIT.
        await CyclesAsync(grains, "warmup", 2_000, 64, response);

        var sequential = await CyclesAsync(grains, "seq", 5_000, 1, response);
        var concurrent = await CyclesAsync(grains, "par", 20_000, 64, response);
        Console.WriteLine(string.Create(CultureInfo.InvariantCulture,
            $"| grain, in-process | claim → complete → replay, one at a time | {sequential.PerSecond:N0} cycles/s | {sequential.MicrosecondsPerCycle:0} µs per cycle |"));
        Console.WriteLine(string.Create(CultureInfo.InvariantCulture,
            $"| grain, in-process | claim → complete → replay, 64 at a time | {concurrent.PerSecond:N0} cycles/s | {concurrent.MicrosecondsPerCycle:0} µs CPU-wall per cycle |"));

        var management = grains.GetGrain<IManagementGrain>(0);
        await management.ForceActivationCollection(TimeSpan.Zero);
        var before = Heap();
        await CyclesAsync(grains, "mem", keys, 64, response);
        var activated = Heap();
        await management.ForceActivationCollection(TimeSpan.Zero);
        var collected = Heap();
        Console.WriteLine(string.Create(CultureInfo.InvariantCulture,
            $"| grain, in-process | managed memory per key, activated (activation + in-memory record, 200-byte body) | {(activated - before) / keys:N0} bytes | {keys:N0} keys |"));
        Console.WriteLine(string.Create(CultureInfo.InvariantCulture,
            $"| grain, in-process | managed memory per key after its activation is collected (the in-memory record only) | {(collected - before) / keys:N0} bytes | so an idle activation costs {(activated - collected) / keys:N0} bytes |"));
        await host.StopAsync();
    }

    private static async Task<(double PerSecond, double MicrosecondsPerCycle)> CyclesAsync(IGrainFactory grains, string prefix, int count, int parallel, StoredResponse response)
    {
        var clock = Stopwatch.StartNew();
        await Parallel.ForEachAsync(Enumerable.Range(0, count), new ParallelOptions { MaxDegreeOfParallelism = parallel }, async (i, _) =>
        {
            var grain = grains.GetIdempotencyGrain(new IdempotencyKey("bench", $"{prefix}-{i}"));
            var request = new ClaimRequest(Guid.NewGuid(), [1, 2, 3], TimeSpan.FromMinutes(1), TimeSpan.FromHours(1));
            var claim = await grain.ClaimAsync(request);
            await grain.CompleteAsync(claim.Token!.Value, response);
            var replay = await grain.ClaimAsync(request with { AttemptId = Guid.NewGuid() });
            if (replay.Outcome != ClaimOutcome.Completed)
            {
                throw new InvalidOperationException($"Key {prefix}-{i} did not replay: {replay.Outcome}.");
            }
        });
        return (count / clock.Elapsed.TotalSeconds, clock.Elapsed.TotalMicroseconds / count);
    }

    private static long Heap()
    {
        GC.Collect(2, GCCollectionMode.Forced, blocking: true, compacting: true);
        GC.WaitForPendingFinalizers();
        GC.Collect(2, GCCollectionMode.Forced, blocking: true, compacting: true);
        return GC.GetTotalMemory(forceFullCollection: true);
    }
}
