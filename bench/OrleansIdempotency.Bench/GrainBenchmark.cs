using System.Diagnostics;
using System.Globalization;
using Microsoft.Extensions.Configuration;
using Microsoft.Extensions.DependencyInjection;
using Microsoft.Extensions.Hosting;
using Microsoft.Extensions.Logging;
using OrleansIdempotency.Grains;
using OrleansIdempotency.Silo.Hosting;
using OrleansIdempotency.Testing;
using static OrleansIdempotency.Bench.Statistics;

namespace OrleansIdempotency.Bench;

/// <summary>
/// The key grain in-process, without HTTP: the claim → complete → replay cycle, a new key's CPU beside Orleans' own
/// floor for the same calls (<see cref="FloorGrain"/>), and the managed memory a key costs while activated and after
/// its activation is collected (in-memory storage, so the record itself stays in memory).
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
        builder.Configuration.AddInMemoryCollection(new Dictionary<string, string?> { ["Orleans:AllowInMemoryRecords"] = "true" });
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
            $"| grain, in-process | managed memory per key after its activation is collected (the in-memory record, and Orleans' cached location of the key while its bounded cache keeps it) | {(collected - before) / keys:N0} bytes | so an idle activation costs {(activated - collected) / keys:N0} bytes |"));

        // Process CPU, not wall time: CPU is what bounds the HTTP figures. The first pairs only warm up (the JIT
        // settles over seconds of load). Each pair runs both back to back, alternating which goes first, and the
        // ratio is taken within the pair: the machine's load drifts over a run, but little within a pair.
        var newKeys = new List<double>();
        var floor = new List<double>();
        var ratios = new List<double>();
        for (var pair = -6; pair < 10; pair++)
        {
            Task<double> NewKeys() => CpuPerKeyAsync($"new{pair}", 20_000, key => NewKeyAsync(grains, key, response));
            Task<double> Floor() => CpuPerKeyAsync($"floor{pair}", 20_000, key => FloorAsync(grains, key, response));
            double newKeyCpu, floorCpu;
            if (pair % 2 == 0)
            {
                newKeyCpu = await NewKeys();
                floorCpu = await Floor();
            }
            else
            {
                floorCpu = await Floor();
                newKeyCpu = await NewKeys();
            }

            if (pair >= 0)
            {
                newKeys.Add(newKeyCpu);
                floor.Add(floorCpu);
                ratios.Add(newKeyCpu / floorCpu);
            }
        }

        Console.WriteLine(string.Create(CultureInfo.InvariantCulture,
            $"| grain, in-process | a new key: claim → complete, 64 at a time | {Median(newKeys):0.0} µs CPU per key | median of {newKeys.Count} pairs; range {newKeys.Min():0.0}-{newKeys.Max():0.0} |"));
        Console.WriteLine(string.Create(CultureInfo.InvariantCulture,
            $"| grain, in-process | Orleans alone: the same two calls to an empty grain that deactivates after the second | {Median(floor):0.0} µs CPU per key | range {floor.Min():0.0}-{floor.Max():0.0}; a new key costs {Median(ratios):0.00}× this (median of the pairs' ratios; {ratios.Min():0.00}-{ratios.Max():0.00}) |"));
        await host.StopAsync();
    }

    private static async Task<(double PerSecond, double MicrosecondsPerCycle)> CyclesAsync(IGrainFactory grains, string prefix, int count, int parallel, StoredResponse response)
    {
        var clock = Stopwatch.StartNew();
        await Parallel.ForEachAsync(Enumerable.Range(0, count), new ParallelOptions { MaxDegreeOfParallelism = parallel }, async (i, _) =>
        {
            var grain = grains.GetIdempotencyGrain(new IdempotencyKey("bench", $"{prefix}-{i}"));
            var request = NewRequest();
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

    private static async Task NewKeyAsync(IGrainFactory grains, string key, StoredResponse response)
    {
        var grain = grains.GetIdempotencyGrain(new IdempotencyKey("bench", key));
        var claim = await grain.ClaimAsync(NewRequest());
        if (!await grain.CompleteAsync(claim.Token!.Value, response))
        {
            throw new InvalidOperationException($"Key {key} did not complete: {claim.Outcome}.");
        }
    }

    private static async Task FloorAsync(IGrainFactory grains, string key, StoredResponse response)
    {
        var grain = grains.GetGrain<IFloorGrain>(key);
        var claim = await grain.ClaimAsync(NewRequest());
        await grain.CompleteAsync(claim.Token!.Value, response);
    }

    private static ClaimRequest NewRequest() => new(Guid.NewGuid(), [1, 2, 3], TimeSpan.FromMinutes(1), TimeSpan.FromHours(1));

    private static async Task<double> CpuPerKeyAsync(string prefix, int count, Func<string, Task> run)
    {
        using var process = Process.GetCurrentProcess();
        var before = process.TotalProcessorTime;
        await Parallel.ForEachAsync(Enumerable.Range(0, count), new ParallelOptions { MaxDegreeOfParallelism = 64 }, async (i, _) => await run($"{prefix}-{i}"));
        process.Refresh();
        return (process.TotalProcessorTime - before).TotalMicroseconds / count;
    }

    private static long Heap()
    {
        GC.Collect(2, GCCollectionMode.Forced, blocking: true, compacting: true);
        GC.WaitForPendingFinalizers();
        GC.Collect(2, GCCollectionMode.Forced, blocking: true, compacting: true);
        return GC.GetTotalMemory(forceFullCollection: true);
    }
}
