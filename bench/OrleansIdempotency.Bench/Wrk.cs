using System.Diagnostics;
using System.Globalization;
using System.Text.RegularExpressions;
using OrleansIdempotency.Testing;

namespace OrleansIdempotency.Bench;

/// <summary>
/// One wrk run's result: throughput, latency percentiles, and the errors (answers other than 2xx, and socket errors),
/// with what they were in <c>ErrorKinds</c>, e.g. <c>409 x3, timeout x1</c>.
/// </summary>
public sealed record WrkResult(double RequestsPerSecond, double P50Ms, double P99Ms, long Requests, long Errors, string ErrorKinds)
{
    /// <summary>wrk's own report.</summary>
    public string Output { get; init; } = "";
}

/// <summary>Drives HTTP load with wrk, whose Lua scripts make each request's <c>Idempotency-Key</c>.</summary>
public static partial class Wrk
{
    /// <summary>
    /// The request generator. <c>mode</c>: <c>plain</c> (no key), <c>new</c> (a fresh key per request),
    /// <c>hot</c> (cycles over keys hot-1..hot-N, completed and active), <c>replay</c> (each thread replays the keys
    /// it created in the <c>new</c> run named by <c>source</c>, once each, then stops; the rate is then taken over the
    /// time until the last thread stopped), <c>dup</c> (a new key every
    /// <c>D</c> requests per thread: duplicates of keys still in flight).
    /// </summary>
    private const string Script = """
        -- Globals, so the main state can read them from each thread in done().
        mode, path, run, count, source, dup = "plain", "/bench/plain", "r", 0, "", 8
        started, stopped = 0, 0

        -- A monotonic clock in milliseconds: a thread that stops by itself (it ran out of keys) stops early, but wrk
        -- divides by the whole duration; done() reports how long the threads actually ran.
        local ffi = require("ffi")
        ffi.cdef[[
        typedef struct { long tv_sec; long tv_nsec; } bench_timespec;
        int clock_gettime(int clock, bench_timespec *time);
        ]]
        local clock = ffi.new("bench_timespec")
        local function now_ms()
          ffi.C.clock_gettime(1, clock)
          return tonumber(clock.tv_sec) * 1000 + tonumber(clock.tv_nsec) / 1e6
        end

        local function stop()
          if stopped == 0 then
            stopped = now_ms()
          end
          wrk.thread:stop()
        end
        local threads = {}
        local body = '{"amount":5.00,"currency":"EUR"}'
        local headers = { ["Authorization"] = "Bearer demo-alice", ["Content-Type"] = "application/json" }
        local limit = 0
        counter = 0
        id = 0

        function setup(thread)
          thread:set("id", #threads + 1)
          table.insert(threads, thread)
        end

        function init(args)
          mode, path, run, count, source, dup = args[1], args[2], args[3], tonumber(args[4]), args[5], tonumber(args[6])
          if mode == "replay" then
            local file = io.open(source .. "." .. id, "r")
            limit = tonumber(file:read("*l"))
            file:close()
          end
        end

        function request()
          counter = counter + 1
          if counter == 1 then
            started = now_ms()
          end
          if mode == "plain" then
            headers["Idempotency-Key"] = nil
          elseif mode == "new" then
            headers["Idempotency-Key"] = run .. "-" .. id .. "-" .. counter
            if count > 0 and counter >= count then
              stop()
            end
          elseif mode == "hot" then
            headers["Idempotency-Key"] = "hot-" .. ((counter * 7 + id) % count + 1)
          elseif mode == "replay" then
            headers["Idempotency-Key"] = source:match("[^/]*$") .. "-" .. id .. "-" .. math.min(counter, limit)
          else
            headers["Idempotency-Key"] = run .. "-" .. id .. "-" .. math.floor(counter / dup)
          end
          return wrk.format("POST", path, headers, body)
        end

        statuses = {}

        function response(status, headers, body)
          if status >= 300 then
            statuses[status] = (statuses[status] or 0) + 1
          end
          if mode == "replay" and counter >= limit then
            stop()
          end
        end

        function done(summary, latency, requests)
          local first, last, all_stopped, codes = math.huge, 0, true, {}
          for _, thread in ipairs(threads) do
            for status, n in pairs(thread:get("statuses")) do
              codes[status] = (codes[status] or 0) + n
            end
            if thread:get("mode") == "new" then
              local file = io.open(thread:get("source") .. "." .. thread:get("id"), "w")
              file:write(thread:get("counter"))
              file:close()
            end
            first = math.min(first, thread:get("started"))
            last = math.max(last, thread:get("stopped"))
            all_stopped = all_stopped and thread:get("stopped") > 0
          end
          if all_stopped then
            io.write(string.format("All threads stopped by themselves after: %.1f ms\n", last - first))
          end
          for status, n in pairs(codes) do
            io.write(string.format("Status %d: %d\n", status, n))
          end
        end
        """;

    private static readonly string ScriptPath = WriteScript();

    private static readonly string[] SocketErrorKinds = ["connect", "read", "write", "timeout"];

    /// <summary>Runs wrk against <paramref name="server"/> and reads its summary.</summary>
    public static async Task<WrkResult> RunAsync(Uri server, string mode, string path, int connections, TimeSpan duration,
        string run = "r", int count = 0, string source = "", int duplicates = 8)
    {
        var threads = Math.Min(2, connections);
        var start = new ProcessStartInfo("wrk",
        [
            "-t", threads.ToString(CultureInfo.InvariantCulture), "-c", connections.ToString(CultureInfo.InvariantCulture),
            "-d", ((int)duration.TotalSeconds).ToString(CultureInfo.InvariantCulture) + "s", "--latency", "-s", ScriptPath, server.ToString(),
            "--", mode, path, run, count.ToString(CultureInfo.InvariantCulture), source, duplicates.ToString(CultureInfo.InvariantCulture),
        ])
        {
            RedirectStandardOutput = true,
            RedirectStandardError = true,
        };
        using var process = Process.Start(start)!;
        var output = await process.StandardOutput.ReadToEndAsync();
        var errors = await process.StandardError.ReadToEndAsync();
        await process.WaitForExitAsync();
        if (process.ExitCode != 0)
        {
            throw new InvalidOperationException($"wrk failed ({process.ExitCode}): {errors}\n{output}");
        }

        return Parse(output) with { Output = output };
    }

    /// <summary>A measured wrk run in which no request completed: no measurement.</summary>
    public sealed class NoRequestsException(string message) : Exception(message);

    private static WrkResult Parse(string output)
    {
        var requests = long.Parse(Total().Match(output).Groups[1].Value, CultureInfo.InvariantCulture);
        // wrk's own rate divides by the whole duration, also when every thread stopped early.
        var rate = StoppedEarly().Match(output) is { Success: true } early
            ? requests / (double.Parse(early.Groups[1].Value, CultureInfo.InvariantCulture) / 1000)
            : double.Parse(Rate().Match(output).Groups[1].Value, CultureInfo.InvariantCulture);
        var non2xx = Non2xx().Match(output) is { Success: true } m ? long.Parse(m.Groups[1].Value, CultureInfo.InvariantCulture) : 0;
        var socketErrors = SocketErrors().Match(output);
        var socket = socketErrors.Success ? socketErrors.Groups.Values.Skip(1).Sum(g => long.Parse(g.Value, CultureInfo.InvariantCulture)) : 0;
        var kinds = Statuses().Matches(output).Select(c => $"{c.Groups[1].Value} x{c.Groups[2].Value}")
            .Concat(socketErrors.Success
                ? SocketErrorKinds.Zip(socketErrors.Groups.Values.Skip(1))
                    .Where(k => k.Second.Value != "0").Select(k => $"{k.First} x{k.Second.Value}")
                : []);
        return new WrkResult(rate, Percentile(output, "50%"), Percentile(output, "99%"), requests, non2xx + socket, string.Join(", ", kinds));
    }

    private static double Percentile(string output, string label)
    {
        var match = Regex.Match(output, $@"^\s*{Regex.Escape(label)}\s+([\d.]+)(us|ms|s)\s*$", RegexOptions.Multiline);
        var value = double.Parse(match.Groups[1].Value, CultureInfo.InvariantCulture);
        return match.Groups[2].Value switch { "us" => value / 1000, "s" => value * 1000, _ => value };
    }

    /// <summary>Removes the script wrk was given (scripts/run-dir.sh removes it if this process dies first).</summary>
    public static void RemoveScript() => Directory.Delete(Path.GetDirectoryName(ScriptPath)!, recursive: true);

    private static string WriteScript()
    {
        var directory = Directory.CreateTempSubdirectory("orleans-idempotency-wrk-").FullName;
        ChildProcesses.TrackDirectory(directory);
        var path = Path.Combine(directory, "bench.lua");
        File.WriteAllText(path, Script);
        return path;
    }

    [GeneratedRegex(@"Requests/sec:\s+([\d.]+)")]
    private static partial Regex Rate();

    [GeneratedRegex(@"All threads stopped by themselves after: ([\d.]+) ms")]
    private static partial Regex StoppedEarly();

    [GeneratedRegex(@"(\d+) requests in")]
    private static partial Regex Total();

    [GeneratedRegex(@"^Status (\d+): (\d+)$", RegexOptions.Multiline)]
    private static partial Regex Statuses();

    [GeneratedRegex(@"Non-2xx or 3xx responses: (\d+)")]
    private static partial Regex Non2xx();

    [GeneratedRegex(@"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")]
    private static partial Regex SocketErrors();
}
