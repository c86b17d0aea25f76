from moestream.main import main

main()
